"""composer.dialogue: the readers of the dialogue / text-to-text sets, on tiny files and on ../shared/data.

Tiny files follow the real shapes (one line or record of each); the real-data checks run when
../shared/data exists next to the repository.
"""
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from composer import dialogue as D
from composer.errors import TaskError
from composer.graph import load_graph, sources, subtasks, validate
from composer.taskdata import check_task, load_splits
from composer.tasks import TaskSpec, list_tasks, load_task

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA} (../shared/data)")


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def gen(fmt: str, splits: dict, inputs: list[str], target: str, metric: str, **over) -> TaskSpec:
    d = {"name": "t", "type": "generation", "data": {"source": "files", "format": fmt, "splits": splits},
         "inputs": inputs, "target": target, "metric": metric, **over}
    return TaskSpec.from_dict(d)


# ----------------------------------------------------------------------------- linearisations

def test_bio_slots_and_strings():
    toks = ["fly", "from", "new", "york", "to", "dallas", "round", "trip"]
    tags = ["O", "O", "B-from", "I-from", "O", "B-to", "B-rt", "I-rt"]
    assert D.bio_slots(toks, tags) == [("from", "new york"), ("to", "dallas"), ("rt", "round trip")]
    # an I- tag that does not continue a span opens one (conlleval's lenient reading)
    assert D.bio_slots(["a", "b", "c"], ["I-x", "I-y", "I-y"]) == [("x", "a"), ("y", "b c")]
    assert D.slot_string([("a", "x;y"), ("b", " z ")]) == "a: x,y; b: z" and D.slot_string([]) == "none"
    assert D.state_string([("food", "Thai"), ("area", "north"), ("food", "Thai")]) == "area=north; food=thai"
    assert D.state_string([]) == "none"
    assert D.history_string([("", "hi"), ("hello", "a table"), ("where?", "north")], 2) == \
        "system: hello\nuser: a table\nsystem: where?\nuser: north"


# ----------------------------------------------------------------------------- readers on tiny files

def test_slu_reader(tmp_path):
    write(tmp_path / "train", "i:O want:O to:O fly:O from:O baltimore:B-fromloc.city_name "
                              "to:O new:B-toloc.city_name york:I-toloc.city_name <=> atis_flight;atis_airfare\n"
                              "play:O 04:45:B-timeRange list::O :O song:B-music_item <=> PlayMusic\n")
    rows = D.read("slu", tmp_path / "train")
    assert rows[0] == {"utterance": "i want to fly from baltimore to new york", "intent": "atis_flight",
                       "intents": "atis_flight;atis_airfare",
                       "slots": "fromloc.city_name: baltimore; toloc.city_name: new york"}
    # split on the last colon: '04:45:B-timeRange', 'list::O'; a bare ':O' is an empty word and dropped
    assert rows[1]["utterance"] == "play 04:45 list: song"
    assert rows[1]["slots"] == "timeRange: 04:45; music_item: song"
    write(tmp_path / "bad", "no intent here:O\n")
    with pytest.raises(TaskError, match="line 1 of .*bad has no ' <=> INTENT' part") as e:
        D.read("slu", tmp_path / "bad")
    one_line(e)


E2E_SRC = ("__start_name__ The Vaults __end_name__ __start_priceRange__ more than £ 30 __end_priceRange__ "
           "__start_customerrating__ 5 out of 5 __end_customerrating__\n")
E2E_TGT = "The Vaults is n't cheap : prices start at £ 30 . It 's family - friendly . <eos>|||0,2,0 4,5,7\n"


def _tar(path: Path, members: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_e2e_tarball_read_in_place_and_detokenised(tmp_path):
    p = _tar(tmp_path / "e2e_aligned.tar.gz", {"e2e_aligned/src_train.txt": E2E_SRC * 2,
                                                "e2e_aligned/train.txt": E2E_TGT + E2E_TGT.replace("Vaults is", "Vaults was")})
    rows = D.read("e2e", p)
    assert rows[0]["mr"] == "name[The Vaults], priceRange[more than £30], customer rating[5 out of 5]"
    assert rows[0]["ref"] == "The Vaults isn't cheap: prices start at £30. It's family-friendly."
    assert len(rows) == 2 and rows[0]["references"] == [rows[0]["ref"], rows[1]["ref"]]
    assert list(tmp_path.iterdir()) == [p]  # nothing unpacked
    grouped = D.read("e2e", p, {"group": True})
    assert len(grouped) == 1 and grouped[0]["ref"] == rows[0]["ref"] and len(grouped[0]["references"]) == 2
    with pytest.raises(TaskError, match="has no member 'e2e_aligned/src_valid.txt'.*fix options.member") as e:
        D.read("e2e", p, {"member": "valid"})
    one_line(e)


def test_e2e_csv_crlf_and_multi_reference(tmp_path):
    (tmp_path / "dev.csv").write_bytes(b'mr,ref\r\n"name[A], food[French]","A serves French food."\r\n'
                                       b'"name[A], food[French]",A is French.\r\n"name[B]",B.\r\n')
    rows = D.read("e2e", tmp_path / "dev.csv", {"group": True})
    assert rows == [{"mr": "name[A], food[French]", "ref": "A serves French food.",
                     "references": ["A serves French food.", "A is French."]},
                    {"mr": "name[B]", "ref": "B.", "references": ["B."]}]
    write(tmp_path / "x.csv", "a,b\n1,2\n")
    with pytest.raises(TaskError, match="an E2E csv needs 'mr' and 'ref'"):
        D.read("e2e", tmp_path / "x.csv")


@pytest.mark.parametrize("content, suffix", [(b"not a tar at all" * 10, ".tar.gz"), (b"PK\x03\x04broken", ".zip")])
def test_corrupted_archive_is_one_line(tmp_path, content, suffix):
    p = tmp_path / f"data{suffix}"
    p.write_bytes(content)
    fmt = "e2e" if suffix == ".tar.gz" else "multiwoz"
    with pytest.raises(TaskError, match=f"archive .*data{suffix} cannot be read .*re-copy it") as e:
        D.read(fmt, p)
    one_line(e)


def test_truncated_tarball_through_a_task(tmp_path):
    p = _tar(tmp_path / "e2e.tar.gz", {"e2e_aligned/src_train.txt": E2E_SRC * 200, "e2e_aligned/train.txt": E2E_TGT * 200})
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    s = gen("e2e", {"train": "e2e.tar.gz"}, ["mr"], " {ref}", "bleu")
    with pytest.raises(TaskError, match="cannot be read") as e:
        load_splits(s, tmp_path)
    one_line(e)


WOZ = [{"dialogue_idx": 7, "dialogue": [
    {"turn_idx": 0, "system_transcript": "", "transcript": "Cheap  food in the north?", "turn_label": [["price range", "cheap"]],
     "belief_state": [{"act": "inform", "slots": [["price range", "cheap"]]}]},
    {"turn_idx": 1, "system_transcript": "What kind of food?", "transcript": "Thai, and the phone number.",
     "turn_label": [["food", "thai"], ["request", "phone"]],
     "belief_state": [{"act": "request", "slots": [["slot", "phone"]]}, {"act": "inform", "slots": [["food", "thai"]]},
                      {"act": "inform", "slots": [["price range", " cheap"]]}]},
    {"turn_idx": 2, "system_transcript": "Bangkok City, 01223 354382.", "transcript": "Thanks, bye.",
     "turn_label": [], "belief_state": [{"act": "inform", "slots": [["food", "thai"]]},
                                        {"act": "inform", "slots": [["price range", "cheap"]]}]},
]}]


def test_woz_state_and_response_views(tmp_path):
    p = write(tmp_path / "woz.json", json.dumps(WOZ))
    rows = D.read("woz", p, {"history": 1})
    assert len(rows) == 3 and [r["turn"] for r in rows] == ["0", "1", "2"]
    assert rows[0]["history"] == "user: Cheap food in the north?" and rows[0]["state"] == "price range=cheap"
    assert rows[1]["history"] == "system: What kind of food?\nuser: Thai, and the phone number."
    assert rows[1]["state"] == "food=thai; price range=cheap" and rows[1]["requests"] == "phone"  # requests apart
    assert rows[2]["requests"] == "none" and rows[2]["dialogue_id"] == "7"
    resp = D.read("woz", p, {"view": "response", "history": 4})
    # the reply to user turn t is the system transcript of turn t+1; the last turn has none in the data
    assert len(resp) == 2 and resp[1]["reply"] == "Bangkok City, 01223 354382."
    assert resp[1]["history"].count("user:") == 2
    with pytest.raises(TaskError, match="is not WOZ 2.0 JSON"):
        D.read("woz", write(tmp_path / "x.json", '{"a": 1}'))
    with pytest.raises(TaskError, match="bad JSON in .*y.json"):
        D.read("woz", write(tmp_path / "y.json", "[{"))


def _meta(**semi):
    return {"hotel": {"book": {"booked": [], "people": semi.pop("people", "")}, "semi": semi},
            "taxi": {"book": {"booked": []}, "semi": {"leaveAt": ""}}}


MULTIWOZ = {"SNG01": {"goal": {}, "log": [
    {"text": "I need a hotel in the east .", "metadata": {}},
    {"text": "How many people ?", "metadata": _meta(area="east", stars="not mentioned")},
    {"text": "2 people , any price .", "metadata": {}},
    {"text": "Booked .", "metadata": _meta(area="east", pricerange="don't care", people="2")},
]}}


def test_multiwoz_zip_read_in_place(tmp_path):
    p = tmp_path / "val.json.zip"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("val.json", json.dumps(MULTIWOZ))
    rows = D.read("multiwoz", p, {"history": 1})
    assert [r["state"] for r in rows] == ["hotel-area=east", "hotel-area=east; hotel-book people=2; hotel-pricerange=dontcare"]
    assert rows[0]["previous_state"] == "none" and rows[1]["previous_state"] == "hotel-area=east"
    assert rows[1]["history"] == "system: How many people ?\nuser: 2 people , any price ." and rows[1]["reply"] == "Booked ."
    assert list(tmp_path.iterdir()) == [p]  # nothing unpacked
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as z:
        z.writestr("a.json", "{}")
        z.writestr("b.json", "{}")
    with pytest.raises(TaskError, match="holds 2 JSON members .*name one with options.member"):
        D.read("multiwoz", tmp_path / "two.zip")


SGD = [{"dialogue_id": "1_00000", "services": ["Restaurants_1"], "turns": [
    {"speaker": "USER", "utterance": "A table in San Jose.", "frames": [{"service": "Restaurants_1", "state": {
        "active_intent": "ReserveRestaurant", "requested_slots": [], "slot_values": {"city": ["San Jose", "SJ"]}}}]},
    {"speaker": "SYSTEM", "utterance": "For how many?", "frames": [{"service": "Restaurants_1"}]},
    {"speaker": "USER", "utterance": "Two.", "frames": [{"service": "Restaurants_1", "state": {
        "active_intent": "ReserveRestaurant", "requested_slots": [],
        "slot_values": {"city": ["San Jose"], "party_size": ["2"]}}}]},
]}]


def test_sgd_file_and_folder(tmp_path):
    write(tmp_path / "train" / "dialogues_001.json", json.dumps(SGD))
    write(tmp_path / "train" / "schema.json", "[]")  # not a dialogue file: left alone
    rows = D.read("sgd", tmp_path / "train")
    assert [r["state"] for r in rows] == ["city=san jose", "city=san jose; party_size=2"]  # first value of a slot
    assert rows[1]["intent"] == "ReserveRestaurant" and rows[1]["service"] == "Restaurants_1"
    assert rows[1]["history"] == "user: A table in San Jose.\nsystem: For how many?\nuser: Two."
    resp = D.read("sgd", tmp_path / "train" / "dialogues_001.json", {"view": "response"})
    assert len(resp) == 1 and resp[0]["reply"] == "For how many?"  # the last user turn has no reply after it
    with pytest.raises(TaskError, match="holds no dialogues_\\*.json files"):
        D.read("sgd", tmp_path)


SQUAD = {"version": "1.1", "data": [
    {"title": f"T{a}", "paragraphs": [{"context": f"Context {a}.", "qas": [
        {"id": f"{a}-{q}", "question": f"Q{q}?", "answers": [{"answer_start": 0, "text": f"A{q}"}]} for q in range(3)]}]}
    for a in range(10)]}


def test_squad_reader_and_part_by_article(tmp_path):
    p = write(tmp_path / "xquad.json", json.dumps(SQUAD))
    rows = D.read("squad", p)
    assert len(rows) == 30 and rows[0] == {"context": "Context 0.", "question": "Q0?", "answer": "A0", "answers": ["A0"],
                                           "id": "0-0", "title": "T0"}
    parts = [D.read("squad", p, {"part": part}) for part in ([0, 0.2], [0.2, 0.5], [0.5, 1.0])]
    assert [len(x) for x in parts] == [6, 9, 15]
    titles = [{r["title"] for r in x} for x in parts]
    assert not (titles[0] & titles[1] or titles[0] & titles[2] or titles[1] & titles[2])  # by article
    assert D.read("squad", p, {"part": [0, 0.2]}) == parts[0]  # deterministic
    assert {r["title"] for r in D.read("squad", p, {"part": [0, 0.2], "part_seed": 1})} != titles[0]


def test_a_dialogue_task_end_to_end(tmp_path):
    write(tmp_path / "woz.json", json.dumps(WOZ))
    s = gen("woz", {"train": "woz.json", "dev": "woz.json"}, ["history"], " {state}", "joint_goal_accuracy",
            data={"source": "files", "format": "woz", "options": {"history": 2},
                  "splits": {"train": "woz.json", "dev": {"path": "woz.json", "options": {"view": "response"}}}},
            template="{history}\nState:")
    ds = load_splits(s, tmp_path)
    assert len(ds["train"]) == 3 and len(ds["dev"]) == 2  # the split's options add to the data-level ones
    assert ds["train"].column_names == ["history", "state"]
    assert s.render_target(ds["train"][1]) == " food=thai; price range=cheap"
    r = check_task(s, tmp_path)
    assert r["splits"]["train"]["rows"] == 3 and r["metric"] == "joint_goal_accuracy"


# ----------------------------------------------------------------------------- the catalogue and the real data

DIALOGUE_TASKS = ["atis-intent", "snips-intent", "atis-slots", "snips-slots", "e2e-nlg", "woz-state", "woz-response",
                  "multiwoz-state", "sgd-state", "sgd-intent", "xquad-en"]


def test_dialogue_tasks_are_catalogued():
    assert set(DIALOGUE_TASKS) <= set(list_tasks())
    assert load_task("e2e-nlg").metric_names == ["rouge_l", "bleu"]
    assert load_task("woz-response").metric_names == ["bleu", "rouge_l"]
    assert load_task("xquad-en").metric_names == ["token_f1", "exact_match"]
    assert load_task("woz-state").metric == "joint_goal_accuracy" and load_task("atis-slots").metric == "slot_f1"
    assert not load_task("atis-intent").is_generation and load_task("atis-intent").num_labels == 18


def test_dialogue_graph_validates():
    G = load_graph(REPO / "graphs" / "dialogue.yaml")
    names = set(list_tasks())
    assert validate(G, task_exists=lambda t: t in names) == []
    assert G.graph["backbone"] == "smollm2-135m" and G.nodes["woz-response"]["role"] == "target"
    assert [n for n, _ in subtasks(G, "woz-response")] == ["sgd-intent", "woz-state", "e2e-nlg"]
    assert {n for n, _ in sources(G, "woz-state")} == {"atis-slots", "snips-slots", "sgd-state", "multiwoz-state"}
    assert {n for n, _ in sources(G, "sgd-intent")} == {"atis-intent", "snips-intent"}


# rows per split, from check_task on ../shared/data (and SOURCES.md where it counts the same thing)
COUNTS = {
    "atis-intent": {"train": 4478, "dev": 500, "test": 893},
    "snips-intent": {"train": 13084, "dev": 700, "test": 700},
    "atis-slots": {"train": 4478, "dev": 500, "test": 893},
    "snips-slots": {"train": 13084, "dev": 700, "test": 700},
    "e2e-nlg": {"train": 42061, "dev": 547, "test": 630},
    "woz-state": {"train": 2536, "dev": 830, "test": 1646},
    "woz-response": {"train": 2536 - 600, "dev": 830 - 200, "test": 1646 - 400},
    "multiwoz-state": {"train": 3689, "dev": 3676, "test": 7372},
    "sgd-state": {"train": 1918, "dev": 825, "test": 768},
    "sgd-intent": {"train": 862, "dev": 185, "test": 186},
    "xquad-en": {"train": 166, "dev": 108, "test": 916},
}


@pytest.fixture(scope="module")
def checked():
    cache: dict = {}

    def get(name):
        if name not in cache:
            cache[name] = check_task(load_task(name), DATA)
        return cache[name]

    return get


@needs_data
@pytest.mark.parametrize("name", DIALOGUE_TASKS)
def test_real_dialogue_task_counts(name, checked):
    r = checked(name)
    assert {s: v["rows"] for s, v in r["splits"].items()} == COUNTS[name]


@needs_data
def test_real_shapes():
    atis = D.read("slu", DATA / "slu_slot_filling_and_intent_detection_of_SLU/ATIS/test")
    assert sum(";" in r["intents"] for r in atis) == 15 and all(r["slots"] for r in atis)
    woz = D.read("woz", DATA / "woz2_neural-belief-tracker/WOZ2.0/woz_validate_en.json")
    slots = {p.split("=")[0] for r in woz for p in r["state"].split("; ") if r["state"] != "none"}
    assert slots == {"area", "food", "price range"}
    e2e = load_splits(load_task("e2e-nlg"), DATA, splits=["test"])["test"]
    assert sum(len(r) for r in e2e["references"]) == 4693  # every test reference, grouped by MR
    xq = load_splits(load_task("xquad-en"), DATA)
    assert sum(len(d) for d in xq.values()) == 1190
    assert not set(xq["train"]["context"]) & set(xq["test"]["context"])  # carved by article
    mw = load_splits(load_task("multiwoz-state"), DATA, splits=["train", "dev"])
    assert sum(len(d) for d in mw.values()) == 7365


@needs_data
def test_real_e2e_train_looks_like_the_csv_references():
    tar = D.read("e2e", DATA / "e2e-aligned_neural-template-gen/E2E/e2e_aligned.tar.gz", {"member": "valid"})
    csv_rows = D.read("e2e", DATA / "e2e_e2e-dataset/E2E/devset.csv")
    # the tarball's valid.txt is devset.csv tokenised, row by row: detokenising gives the MR back exactly
    # and the reference in all but a few hundred rows (the CSV's own odd spacing, quotes)
    assert all(a["mr"] == b["mr"] for a, b in zip(tar, csv_rows))
    assert sum(a["ref"] == b["ref"] for a, b in zip(tar, csv_rows)) / len(tar) > 0.95


@needs_data
def test_real_generation_k_shot():
    ds = load_splits(load_task("woz-state"), DATA, splits=["train"], k_shot=32, seed=13)["train"]
    assert len(ds) == 32 and ds["state"] != load_splits(load_task("woz-state"), DATA, splits=["train"],
                                                        k_shot=32, seed=14)["train"]["state"]
