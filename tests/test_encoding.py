"""composer.encoding: the one template renderer, and truncation that keeps the template's literal text."""
import pytest
import yaml

from composer.encoding import encode_row, encode_rows, parse_template, render, template_fields
from composer.errors import TaskError
from composer.tasks import TaskSpec, load_task

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "a", "small", "cat", "sleeps",
         "near", "the", "warm", "fire"]


def words(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(i + offset) % len(WORDS)] for i in range(n))


def spec(**over) -> TaskSpec:
    d = {"name": "toy", "data": {"source": "files", "format": "csv", "splits": {"train": "train.csv"}},
         "inputs": ["sentence"], "labels": ["0", "1"]}
    d.update(over)
    return TaskSpec.from_dict(d)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- rendering

@pytest.mark.parametrize(
    "template, row, out",
    [
        ("{premise} Question: {hypothesis}", {"premise": "a", "hypothesis": "b"}, "a Question: b"),
        ("Q: {{lit}} {sentence}", {"sentence": "text"}, "Q: {lit} text"),
        ("{{ {sentence} }}", {"sentence": "text"}, "{ text }"),
        ("{sentence}", {"sentence": "{x} and {{y}} and }"}, "{x} and {{y}} and }"),  # values are not re-read
        ("{n} / {n}", {"n": 3}, "3 / 3"),
        ("no fields", {}, "no fields"),
    ],
)
def test_render(template, row, out):
    assert render(template, row) == out


def test_render_agrees_with_str_format():
    t = "{{a}} {a}: {b} }}{{"
    row = {"a": "x", "b": 2}
    assert render(t, row) == t.format(**row)


def test_template_fields_in_order_each_once():
    assert template_fields("{b} {{c}} {a} {b}") == ["b", "a"]
    assert parse_template("Q: {{lit}} {s}!") == (("Q: {", None), ("lit}", None), (" ", "s"), ("!", None))


def test_missing_field_is_a_task_error_not_a_key_error():
    with pytest.raises(TaskError, match="template 'Q: {sentence}' uses field 'sentence' but the row has text, label; "
                                        "add the column") as e:
        render("Q: {sentence}", {"text": "a", "label": 1})
    one_line(e)
    assert not isinstance(e.value, KeyError)


@pytest.mark.parametrize(
    "template, match",
    [
        ("{sentence!r}", "has a conversion '!r' on field 'sentence'; write plain {name} placeholders"),
        ("{sentence:>3}", "has a format spec ':>3' on field 'sentence'; .*format specs .* are not supported"),
        ("{} {sentence}", "has the placeholder '{}', not a plain field name"),
        ("{sentence.upper}", "has the placeholder '{sentence.upper}', not a plain field name"),
        ("{sentence} }", "cannot be parsed \\(Single '}' encountered.*\\); write '{{' and '}}' for literal braces"),
        ("{ {sentence} }", "cannot be parsed"),
    ],
)
def test_bad_templates(template, match):
    with pytest.raises(TaskError, match=match) as e:
        render(template, {"sentence": "x"})
    one_line(e)
    with pytest.raises(TaskError, match="task toy: field 'template' " + match) as e:
        spec(template=template)
    one_line(e)


# ----------------------------------------------------------------------------- task specs use the same renderer

def test_task_with_literal_braces_validates_and_renders(tmp_path):
    s = spec(template="Q: {{lit}} {sentence}")
    assert s.render({"sentence": "text", "label": "0"}) == "Q: {lit} text"
    p = tmp_path / "braces.yaml"
    p.write_text(yaml.safe_dump({**spec().to_dict(), "name": "braces", "template": "Q: {{lit}} {sentence}"}))
    loaded = load_task(p)
    assert loaded.template == "Q: {{lit}} {sentence}"
    assert loaded.render({"sentence": "a {b}"}) == render(loaded.template, {"sentence": "a {b}"}) == "Q: {lit} a {b}"


def test_task_render_missing_field_names_the_task():
    with pytest.raises(TaskError, match="task toy: template '{sentence}' uses field 'sentence'") as e:
        spec().render({"text": "a"})
    one_line(e)


# ----------------------------------------------------------------------------- truncation keeps the template

TEMPLATE = "Premise: {premise} {{hint}} Question: {hypothesis} Answer:"


def test_short_rows_are_unchanged(tokenizer):
    row = {"premise": "a cat", "hypothesis": "a dog"}
    ids = encode_row(tokenizer, TEMPLATE, row, 64)
    assert ids == tokenizer(render(TEMPLATE, row))["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "premise : a cat { hint } question : a dog answer :"


@pytest.mark.parametrize("max_length", [18, 24, 40])
def test_the_longest_field_is_cut_and_the_template_survives(tokenizer, max_length):
    hyp = "is the dog lazy"
    row = {"premise": words(80), "hypothesis": hyp}
    ids = encode_row(tokenizer, TEMPLATE, row, max_length)
    assert len(ids) <= max_length
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith("premise : the quick")
    assert text.endswith(" { hint } question : is the dog lazy answer :"), text  # literal braces, short field kept
    kept = text[len("premise : "): text.index(" { hint }")].split()
    assert 0 < len(kept) < 80 and kept == words(len(kept)).split()  # the premise lost its tail, nothing else


def test_of_two_long_fields_the_longer_loses_tokens(tokenizer):
    row = {"premise": words(60), "hypothesis": words(20, offset=3)}
    text = tokenizer.decode(encode_row(tokenizer, TEMPLATE, row, 48), skip_special_tokens=True)
    assert text.endswith(" { hint } question : " + words(20, offset=3) + " answer :"), text


def test_a_template_that_alone_does_not_fit_keeps_its_head_and_end_token(tokenizer):
    template = "Read this and then answer the question that follows it carefully: {sentence} Answer:"
    ids = encode_row(tokenizer, template, {"sentence": words(30)}, 8)
    assert len(ids) == 8 and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "read this and then answer the"
    assert len(encode_row(tokenizer, words(40) + " {{x}}", {}, 8)) == 8  # no fields to cut


def test_encode_rows_matches_encode_row(tokenizer):
    rows = [{"premise": words(n), "hypothesis": words(m, offset=5) + " {really}?"}
            for n, m in [(2, 2), (70, 3), (5, 40), (0, 0), (33, 33)]]
    batched = encode_rows(tokenizer, TEMPLATE, rows, 32)
    assert batched == [encode_row(tokenizer, TEMPLATE, r, 32) for r in rows]
    assert all(len(x) <= 32 for x in batched)
    assert batched[0] == tokenizer(render(TEMPLATE, rows[0]))["input_ids"]
    assert encode_rows(tokenizer, TEMPLATE, [], 32) == []


def test_a_max_length_with_no_room_for_the_text_is_refused(tokenizer):
    """A max_length the template alone fills would encode every row to the template: one line, before training."""
    from composer.encoding import encode_split

    rows = [{"sentence": words(12), "label": 0}, {"sentence": words(5), "label": 1}]
    long_template = "Read this and then answer the question that follows it: {sentence} Answer:"
    with pytest.raises(TaskError) as e:
        encode_split(spec(template=long_template, max_length=8), rows, tokenizer)
    msg = one_line(e)
    assert "max_length 8 leaves no room for the input" in msg and "raise max_length" in msg
    enc = encode_split(spec(template="{sentence}", max_length=8), rows, tokenizer)  # room: it is cut, not refused
    assert max(len(x) for x in enc.ids) <= 8
    assert tokenizer.decode(enc.ids[0], skip_special_tokens=True).startswith("the quick")


def test_little_room_for_the_text_warns(tokenizer, caplog):
    from composer.encoding import encode_split, template_length

    template = "Read this and answer: {sentence} Answer:"
    n = template_length(tokenizer, template) + 3
    with caplog.at_level("WARNING", logger="composer.encoding"):
        enc = encode_split(spec(template=template, max_length=n), [{"sentence": words(12), "label": 0}], tokenizer)
    assert "leaves 3 tokens for the input fields" in caplog.text
    assert len(enc.ids[0]) <= n and "the" in tokenizer.decode(enc.ids[0], skip_special_tokens=True)
