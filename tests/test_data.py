"""rlhf_cli.data.io: every accepted format is detected and normalised, every bad input gets a message naming where.

Pure library tests: no model is loaded. Exact counts come from small files written here; the example files
under examples/data (hand-written ones and samples of real data sets) are read by path to check that what the
project ships actually loads.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import EXAMPLES, A, S, U, write_jsonl

from rlhf_cli.core.errors import DataError
from rlhf_cli.data import load_prefs, load_prompts, load_sft, parse_transcript, read_records, split_eval


def jsonl_rows(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


# ---------------------------------------------------------------------------------------------------------
# SFT formats


def test_sft_messages_kept_as_is(tmp_path):
    convo = [S("be brief"), U("hi"), A("hello"), U("and?"), A("bye")]
    ds = load_sft(str(write_jsonl(tmp_path / "m.jsonl", [{"messages": convo}, {"messages": [U("q"), A("a")]}])))
    assert ds.format == "messages"
    assert ds.rows == [{"messages": convo}, {"messages": [U("q"), A("a")]}]
    assert (ds.read, ds.kept, dict(ds.dropped)) == (2, 2, {})


def test_sft_sharegpt_conversations_roles_mapped(tmp_path):
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    ds = load_sft(str(write_jsonl(tmp_path / "c.jsonl", [row])))
    assert ds.format == "messages"
    assert ds.rows == [{"messages": [U("hi"), A("hello")]}]


def test_sft_prompt_completion_strings_and_message_lists(tmp_path):
    rows = [{"prompt": "2+2?", "completion": "4"},
            {"prompt": [S("math"), U("3+3?")], "completion": [A("6")]}]
    ds = load_sft(str(write_jsonl(tmp_path / "pc.jsonl", rows)))
    assert ds.format == "prompt-completion"
    assert ds.rows == [{"messages": [U("2+2?"), A("4")]},
                       {"messages": [S("math"), U("3+3?"), A("6")]}]


def test_sft_alpaca_with_and_without_input(tmp_path):
    rows = [{"instruction": "Translate to French.", "input": "cat", "output": "chat"},
            {"instruction": "Name a colour.", "input": "", "output": "blue"},
            {"instruction": "Say hi.", "output": "hi"}]
    ds = load_sft(str(write_jsonl(tmp_path / "a.jsonl", rows)))
    assert ds.format == "alpaca"
    assert ds.rows == [{"messages": [U("Translate to French.\n\ncat"), A("chat")]},
                       {"messages": [U("Name a colour."), A("blue")]},
                       {"messages": [U("Say hi."), A("hi")]}]


def test_sft_prompt_response(tmp_path):
    ds = load_sft(str(write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "p", "response": "r"}])))
    assert ds.format == "prompt-response"
    assert ds.rows == [{"messages": [U("p"), A("r")]}]


def test_sft_prompt_response_csv_with_commas_and_quotes(tmp_path):
    p = tmp_path / "pr.csv"
    with p.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "response"])
        w.writerow(["Hello, who are you?", 'I am "the" assistant.'])
        w.writerow(["Multi\nline?", "yes"])
    ds = load_sft(str(p))
    assert ds.format == "prompt-response"
    assert ds.rows == [{"messages": [U("Hello, who are you?"), A('I am "the" assistant.')]},
                       {"messages": [U("Multi\nline?"), A("yes")]}]


def test_sft_transcripts_single_and_multi_turn(tmp_path):
    rows = [{"text": "\n\nHuman: What is 2+2?\n\nAssistant: 4."},
            {"text": "Human: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks"}]
    ds = load_sft(str(write_jsonl(tmp_path / "t.jsonl", rows)))
    assert ds.format == "transcript"
    assert ds.rows == [{"messages": [U("What is 2+2?"), A("4.")]},
                       {"messages": [U("hi"), A("hello"), U("how are you?"), A("fine, thanks")]}]


def test_parse_transcript_rejects_plain_text():
    assert parse_transcript("just some text") is None
    assert parse_transcript("\n\nHuman: q\n\nAssistant: a") == [U("q"), A("a")]


def test_sft_format_flag_forces_the_reading(tmp_path):
    path = str(write_jsonl(tmp_path / "both.jsonl", [{"prompt": "p", "completion": "C", "response": "R"}]))
    assert load_sft(path).rows == [{"messages": [U("p"), A("C")]}]  # auto: prompt+completion wins
    forced = load_sft(path, fmt="prompt-response")
    assert forced.format == "prompt-response"
    assert forced.rows == [{"messages": [U("p"), A("R")]}]


def test_sft_forced_format_that_does_not_fit_names_the_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [U("q"), A("a")]}])
    with pytest.raises(DataError) as e:
        load_sft(str(path), fmt="alpaca")
    assert "m.jsonl:1" in str(e.value) and "'instruction'" in str(e.value)


def test_sft_unknown_format_name(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [U("q"), A("a")]}])
    with pytest.raises(DataError, match="unknown SFT format"):
        load_sft(str(path), fmt="chatml")


def test_sft_undetectable_fields_listed(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as e:
        load_sft(str(path))
    msg = str(e.value)
    assert "x.jsonl:1" in msg and "cannot tell the data format" in msg and "['answer', 'question']" in msg
    assert "--format" in msg


def test_sft_summary_counts_dropped_rows_with_reasons(tmp_path):
    rows = [{"messages": [U("q1"), A("a1")]},
            {"messages": [U("only a question")]},
            {"messages": [U("q3"), A("   ")]},
            {"messages": [U("q4"), A("a4"), U("trailing user turn")]},
            {"prompt": "q5", "completion": "a5"}]  # format is read from the first row; this one lacks messages
    with pytest.raises(DataError) as e:
        load_sft(str(write_jsonl(tmp_path / "mixed.jsonl", rows)))
    assert "mixed.jsonl:5" in str(e.value) and "'messages'" in str(e.value)

    ds = load_sft(str(write_jsonl(tmp_path / "d.jsonl", rows[:4])))
    assert ds.read == 4 and ds.kept == 2
    assert ds.dropped == Counter({"without an assistant turn": 1, "with an empty answer": 1})
    assert ds.rows[1] == {"messages": [U("q4"), A("a4")]}  # trailing user turn trimmed
    s = ds.summary()
    assert (s["rows_read"], s["kept"], s["format"]) == (4, 2, "messages")
    assert s["dropped"] == {"without an assistant turn": 1, "with an empty answer": 1}
    assert len(s["fingerprint"]) == 16
    assert "4 rows read, 2 rows kept, dropped: 1 without an assistant turn, 1 with an empty answer" in ds.describe()


def test_sft_all_rows_dropped_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"messages": [U("q")]}, {"messages": [U("q2")]}])
    with pytest.raises(DataError, match="no usable rows left"):
        load_sft(str(path))


def test_sft_max_samples(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)]
    ds = load_sft(str(write_jsonl(tmp_path / "many.jsonl", rows)), max_samples=3)
    assert ds.kept == 3
    assert [r["messages"][0]["content"] for r in ds.rows] == ["p0", "p1", "p2"]


def test_sft_fingerprint_tracks_content(tmp_path):
    a = load_sft(str(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"}])))
    b = load_sft(str(write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "c"}])))
    c = load_sft(str(write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "completion": "d"}])))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


# ---------------------------------------------------------------------------------------------------------
# File kinds and sources


SFT_ROWS = [{"prompt": "p0", "completion": "c0"}, {"prompt": "p1", "completion": "c1"}]
SFT_EXPECTED = [{"messages": [U("p0"), A("c0")]}, {"messages": [U("p1"), A("c1")]}]


def test_reads_json_list_and_wrapped_list(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps(SFT_ROWS), encoding="utf-8")
    (tmp_path / "w.json").write_text(json.dumps({"data": SFT_ROWS, "version": 1}), encoding="utf-8")
    assert load_sft(str(tmp_path / "l.json")).rows == SFT_EXPECTED
    assert load_sft(str(tmp_path / "w.json")).rows == SFT_EXPECTED


def test_reads_parquet(tmp_path):
    from datasets import Dataset

    Dataset.from_list(SFT_ROWS).to_parquet(str(tmp_path / "d.parquet"))
    ds = load_sft(str(tmp_path / "d.parquet"))
    assert ds.rows == SFT_EXPECTED and ds.read == 2


def test_reads_parquet_preferences_with_message_lists(tmp_path):
    from datasets import Dataset

    rows = [{"prompt": [U("q")], "chosen": [A("good")], "rejected": [A("bad")]}]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    ds = load_prefs(str(tmp_path / "p.parquet"))
    assert ds.format == "explicit"
    assert ds.rows[0]["prompt"] == [U("q")] and ds.rows[0]["chosen"] == [A("good")]


def test_csv_cells_holding_json_are_decoded(tmp_path):
    p = tmp_path / "m.csv"
    with p.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        w.writerow([json.dumps([U("hi"), A("hello")])])
    assert load_sft(str(p)).rows == [{"messages": [U("hi"), A("hello")]}]


def test_reads_a_folder_of_files_in_name_order(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "b.jsonl", [SFT_ROWS[1]])
    write_jsonl(d / "a.jsonl", [SFT_ROWS[0]])
    (d / "notes.txt").write_text("ignored")
    write_jsonl(d / "sub" / "c.jsonl", [{"prompt": "p2", "completion": "c2"}])
    ds = load_sft(str(d))
    assert ds.read == 3
    assert [r["messages"][0]["content"] for r in ds.rows] == ["p0", "p1", "p2"]


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="folder holds no"):
        load_sft(str(tmp_path / "empty"))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    (tmp_path / "empty.jsonl").write_text(content)
    with pytest.raises(DataError) as e:
        load_sft(str(tmp_path / "empty.jsonl"))
    assert str(e.value).startswith(f"--data {tmp_path / 'empty.jsonl'}: no rows")
    with pytest.raises(DataError, match="no rows"):
        load_prefs(str(tmp_path / "empty.jsonl"))


def test_missing_file_named_with_flag(tmp_path):
    with pytest.raises(DataError) as e:
        load_sft(str(tmp_path / "nope.jsonl"), flag="--eval-data")
    assert str(e.value).startswith(f"--eval-data {tmp_path / 'nope.jsonl'}: no such file")


def test_hub_name_offline_is_a_data_error():
    with pytest.raises(DataError) as e:
        load_sft("no-such-org-xyz/no-such-dataset:train")
    msg = str(e.value)
    assert msg.startswith("--data no-such-org-xyz/no-such-dataset:train: cannot load hub dataset")
    assert "\n" not in msg


def test_not_a_file_folder_or_hub_name():
    with pytest.raises(DataError, match="not a file, folder or hub dataset name"):
        read_records("what is this?")


# ---------------------------------------------------------------------------------------------------------
# Errors name file:line and field


def test_broken_json_line_named(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_sft(str(p))
    assert f"{p}:2: not valid JSON" in str(e.value)


def test_non_object_line_named(tmp_path):
    p = tmp_path / "list.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"list\.jsonl:2: expected a JSON object, found list"):
        load_sft(str(p))


def test_broken_json_file_named(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[\n{"prompt": "a",\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json:\d+: not valid JSON"):
        load_sft(str(p))


def test_example_bad_sft_names_line_2():
    with pytest.raises(DataError) as e:
        load_sft(str(EXAMPLES / "bad_sft.jsonl"))
    assert "bad_sft.jsonl:2" in str(e.value)


def test_example_bad_prefs_names_line_and_field():
    with pytest.raises(DataError) as e:
        load_prefs(str(EXAMPLES / "bad_prefs.jsonl"))
    assert ":2" in str(e.value) and "'rejected'" in str(e.value)


def test_missing_rejected_names_line_and_field(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q2", "chosen": "a2"}]
    with pytest.raises(DataError) as e:
        load_prefs(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert f"{tmp_path / 'p.jsonl'}:2: field 'rejected'" in str(e.value)


def test_wrong_field_type_names_field_and_found_value(tmp_path):
    with pytest.raises(DataError) as e:
        load_sft(str(write_jsonl(tmp_path / "t.jsonl", [{"prompt": 42, "completion": "x"}])))
    assert "t.jsonl:1: field 'prompt': found 42; expected a string" in str(e.value)


def test_bad_role_names_message_index(tmp_path):
    rows = [{"messages": [U("q"), {"role": "robot", "content": "beep"}]}]
    with pytest.raises(DataError) as e:
        load_sft(str(write_jsonl(tmp_path / "r.jsonl", rows)))
    assert "r.jsonl:1: field 'messages[1].role'" in str(e.value) and "'robot'" in str(e.value)


def test_csv_error_names_csv_line(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("prompt,completion,extra\np,c,1\n,c2,2\n", encoding="utf-8")  # empty prompt cell reads as None
    with pytest.raises(DataError) as e:
        load_sft(str(p))
    assert f"{p}:3: field 'prompt'" in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# Preference formats


def test_prefs_explicit_strings(tmp_path):
    rows = [{"prompt": "q1", "chosen": "good", "rejected": "bad"}, {"prompt": "q2", "chosen": "yes", "rejected": "no"}]
    ds = load_prefs(str(write_jsonl(tmp_path / "e.jsonl", rows)))
    assert ds.format == "explicit" and ds.prompts == 2 and ds.kept == 2
    assert ds.rows[0] == {"prompt": [U("q1")], "chosen": [A("good")], "rejected": [A("bad")], "margin": 0.0,
                          "group": 0}
    assert ds.rows[1]["group"] == 1


def test_prefs_explicit_messages_and_hh_prompt(tmp_path):
    rows = [{"prompt": [S("sys"), U("q"), A("a"), U("q2")], "chosen": [A("good")], "rejected": {"role": "assistant",
                                                                                                   "content": "bad"}},
            {"prompt": "\n\nHuman: hello\n\nAssistant:", "chosen": "hi!", "rejected": "go away"}]
    ds = load_prefs(str(write_jsonl(tmp_path / "e.jsonl", rows)))
    assert ds.rows[0]["prompt"] == [S("sys"), U("q"), A("a"), U("q2")]
    assert (ds.rows[0]["chosen"], ds.rows[0]["rejected"]) == ([A("good")], [A("bad")])
    assert ds.rows[1]["prompt"] == [U("hello")]


def test_prefs_implicit_messages(tmp_path):
    rows = [{"chosen": [U("q"), A("a"), U("q2"), A("good")], "rejected": [U("q"), A("a"), U("q2"), A("bad")]}]
    ds = load_prefs(str(write_jsonl(tmp_path / "i.jsonl", rows)))
    assert ds.format == "implicit"
    assert ds.rows[0]["prompt"] == [U("q"), A("a"), U("q2")]
    assert (ds.rows[0]["chosen"], ds.rows[0]["rejected"]) == ([A("good")], [A("bad")])


def test_prefs_implicit_transcripts(tmp_path):
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: a funny one",
             "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: no"}]
    ds = load_prefs(str(write_jsonl(tmp_path / "hh.jsonl", rows)))
    assert ds.format == "implicit"
    assert ds.rows[0]["prompt"] == [U("hi"), A("hello"), U("joke?")]
    assert (ds.rows[0]["chosen"], ds.rows[0]["rejected"]) == ([A("a funny one")], [A("no")])


def test_prefs_implicit_without_shared_prompt_is_an_error(tmp_path):
    rows = [{"chosen": [U("q"), A("a")], "rejected": [U("other"), A("b")]}]
    with pytest.raises(DataError, match=r"i\.jsonl:1: field 'chosen'"):
        load_prefs(str(write_jsonl(tmp_path / "i.jsonl", rows)))


def _pairs(ds) -> list[tuple[str, str]]:
    return [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in ds.rows]


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_prefs_ranked_best_first_gives_k_choose_2_pairs(tmp_path, k):
    rows = [{"prompt": "q", "responses": [f"r{i}" for i in range(k)]},
            {"prompt": "other", "completions": [f"s{i}" for i in range(k)]}]
    ds = load_prefs(str(write_jsonl(tmp_path / "rk.jsonl", rows)))
    assert ds.format == "ranked"
    assert ds.kept == 2 * k * (k - 1) // 2 and ds.prompts == 2
    first = [p for p in ds.rows if p["prompt"] == [U("q")]]
    assert len(first) == k * (k - 1) // 2
    # best first: the earlier response is always the chosen one
    assert sorted(_pairs(ds)[:len(first)]) == sorted((f"r{i}", f"r{j}") for i in range(k) for j in range(i + 1, k))


def test_prefs_ranking_indices(tmp_path):
    rows = [{"prompt": "q", "responses": ["A", "B", "C"], "ranking": [2, 0, 1]}]
    ds = load_prefs(str(write_jsonl(tmp_path / "rk.jsonl", rows)))
    assert sorted(_pairs(ds)) == sorted([("C", "A"), ("C", "B"), ("A", "B")])


def test_prefs_ranking_ties_as_inner_list(tmp_path):
    rows = [{"prompt": "q", "responses": ["A", "B", "C"], "ranking": [2, [0, 1]]}]
    ds = load_prefs(str(write_jsonl(tmp_path / "rk.jsonl", rows)))
    assert sorted(_pairs(ds)) == [("C", "A"), ("C", "B")]
    assert ds.dropped == Counter({"tied pairs skipped": 1})


def test_prefs_retraction_rows_cancel_the_latest_ranking_of_that_item_and_annotator(tmp_path):
    def row(item, who, ranking):
        return {"prompt": "q" + item, "responses": ["A", "B", "C"], "ranking": ranking, "item": item,
                "annotator": who}

    rows = [row("x", "ana", [0, 1, 2]), row("x", "bo", [2, 1, 0]), {"retract": "x", "annotator": "ana"},
            row("x", "ana", [1, [0, 2]]), row("y", "ana", [2, 0, 1]), {"retract": "y", "annotator": "ana"},
            {"retract": "y", "annotator": "ana"}]  # the second finds nothing left to cancel
    ds = load_prefs(str(write_jsonl(tmp_path / "rk.jsonl", rows)))
    assert ds.read == 7 and ds.prompts == 1
    assert ds.dropped == Counter({"rankings undone": 2, "tied pairs skipped": 1})
    assert sorted(_pairs(ds)) == sorted([("C", "B"), ("C", "A"), ("B", "A"), ("B", "A"), ("B", "C")])
    with pytest.raises(DataError, match="every ranking in it was undone"):
        load_prefs(str(write_jsonl(tmp_path / "all.jsonl", rows[4:6])))


@pytest.mark.parametrize("ranking", [[0, 1], [0, 1, 1], [0, 1, 3], "0,1,2"])
def test_prefs_bad_ranking_names_field(tmp_path, ranking):
    rows = [{"prompt": "q", "responses": ["A", "B", "C"], "ranking": ranking}]
    with pytest.raises(DataError) as e:
        load_prefs(str(write_jsonl(tmp_path / "rk.jsonl", rows)))
    assert "rk.jsonl:1: field 'ranking'" in str(e.value) and "0..2" in str(e.value)


def test_prefs_scores_with_ties_skipped_and_counted(tmp_path):
    rows = [{"prompt": "q", "responses": ["A", "B", "C", "D"], "scores": [1, 3, 3, 0.5]},
            {"prompt": "q2", "responses": ["E", "F"], "scores": [2, 2]},
            {"prompt": "q3", "responses": ["G", "H"], "scores": [0, 1]}]
    ds = load_prefs(str(write_jsonl(tmp_path / "sc.jsonl", rows)))
    assert sorted(_pairs(ds)) == sorted([("B", "A"), ("C", "A"), ("B", "D"), ("C", "D"), ("A", "D"), ("H", "G")])
    assert ds.dropped == Counter({"tied pairs skipped": 2})
    assert ds.prompts == 2  # q2 gave no pairs at all
    assert ds.read == 3
    assert all(r["margin"] == 0.0 for r in ds.rows)  # margins only with use_margin


def test_prefs_margins_from_scores(tmp_path):
    rows = [{"prompt": "q", "responses": ["A", "B", "C"], "scores": [1.0, 3.5, 0.0]}]
    ds = load_prefs(str(write_jsonl(tmp_path / "sc.jsonl", rows)), use_margin=True)
    margins = {(r["chosen"][0]["content"], r["rejected"][0]["content"]): r["margin"] for r in ds.rows}
    assert margins == {("B", "A"): 2.5, ("B", "C"): 3.5, ("A", "C"): 1.0}


def test_prefs_explicit_margin_field_only_with_use_margin(tmp_path):
    path = str(write_jsonl(tmp_path / "m.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2}]))
    assert load_prefs(path).rows[0]["margin"] == 0.0
    assert load_prefs(path, use_margin=True).rows[0]["margin"] == 2.0


def test_prefs_bad_scores_names_field(tmp_path):
    rows = [{"prompt": "q", "responses": ["A", "B"], "scores": [1, "high"]}]
    with pytest.raises(DataError, match=r"sc\.jsonl:1: field 'scores'.*a list of 2 numbers"):
        load_prefs(str(write_jsonl(tmp_path / "sc.jsonl", rows)))


def test_prefs_group_ids_shared_by_one_prompts_pairs(tmp_path):
    rows = [{"prompt": "q0", "responses": ["a", "b", "c"]},
            {"prompt": "q1", "chosen": "x", "rejected": "y"},  # read as ranked: format comes from the first row
            ]
    with pytest.raises(DataError, match=r"g\.jsonl:2: field 'responses'"):
        load_prefs(str(write_jsonl(tmp_path / "g.jsonl", rows)))
    rows = [{"prompt": "q0", "responses": ["a", "b", "c"]},
            {"prompt": "q1", "responses": ["d", "e", "f", "g"]},
            {"prompt": "q0", "responses": ["h", "i"]}]  # the same prompt again joins its group
    ds = load_prefs(str(write_jsonl(tmp_path / "g.jsonl", rows)))
    by_prompt: dict[str, set[int]] = {}
    for r in ds.rows:
        by_prompt.setdefault(r["prompt"][0]["content"], set()).add(r["group"])
    assert by_prompt == {"q0": {0}, "q1": {1}}
    assert Counter(r["group"] for r in ds.rows) == {0: 4, 1: 6}
    assert ds.prompts == 2


def test_prefs_empty_and_identical_answers_dropped(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": "q2", "chosen": "same", "rejected": "same"},
            {"prompt": "q3", "chosen": " ", "rejected": "b"}]
    ds = load_prefs(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert ds.kept == 1 and ds.read == 3
    assert ds.dropped == Counter({"pairs with identical answers": 1, "pairs with an empty answer": 1})
    assert ds.summary()["prompts"] == 1
    assert "3 rows read, 1 pairs kept (from 1 prompts)" in ds.describe()


def test_prefs_max_samples_counts_prompts_not_pairs(tmp_path):
    rows = [{"prompt": f"q{i}", "responses": ["a", "b", "c"]} for i in range(5)]
    ds = load_prefs(str(write_jsonl(tmp_path / "m.jsonl", rows)), max_samples=2)
    assert ds.prompts == 2 and ds.kept == 6


def test_prefs_undetectable(tmp_path):
    with pytest.raises(DataError, match="cannot tell the data format"):
        load_prefs(str(write_jsonl(tmp_path / "x.jsonl", [{"prompt": "q", "answer": "a"}])))


def test_prefs_unknown_format_name(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="unknown preference format"):
        load_prefs(str(path), fmt="pairwise")


def test_prefs_forced_explicit_on_implicit_rows_needs_prompt(tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", [{"chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")]}])
    with pytest.raises(DataError, match=r"i\.jsonl:1: field 'prompt'"):
        load_prefs(str(path), fmt="explicit")


# ---------------------------------------------------------------------------------------------------------
# Prompts


def test_prompts_from_prompt_files_prefs_and_sft(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [U("q1")]}, {"prompt": "q2"}, {"prompt": "q2"}])
    ds = load_prompts(str(prompts))
    assert ds.rows == [{"prompt": [U("q1")]}, {"prompt": [U("q2")]}]
    assert ds.dropped == Counter({"duplicate prompts": 1})

    prefs = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": [U("a"), A("b"), U("c")], "chosen": "x", "rejected": "y"}])
    assert load_prompts(str(prefs)).rows == [{"prompt": [U("a"), A("b"), U("c")]}]

    sft = write_jsonl(tmp_path / "s.jsonl", [{"messages": [U("hi"), A("hello"), U("more"), A("ok")]},
                                              {"instruction": "do", "input": "this", "output": "done"}])
    assert load_prompts(str(sft)).rows == [{"prompt": [U("hi"), A("hello"), U("more")]},
                                          {"prompt": [U("do\n\nthis")]}]

    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: hey\n\nAssistant: yo", "rejected": "x"}])
    assert load_prompts(str(hh)).rows == [{"prompt": [U("hey")]}]


def test_prompts_max_samples_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(6)])
    assert load_prompts(str(path), max_samples=4).kept == 4
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q"}, {"question": "?"}])
    with pytest.raises(DataError, match=r"b\.jsonl:2: no prompt in fields \['question'\]"):
        load_prompts(str(bad))


def test_prompts_from_shipped_hh_files():
    ds = load_prompts(str(EXAMPLES / "hh_prompts_test.jsonl"))
    assert ds.read == ds.kept == jsonl_rows(EXAMPLES / "hh_prompts_test.jsonl") == 107
    assert all(r["prompt"][-1]["role"] == "user" for r in ds.rows)
    from_prefs = load_prompts(str(EXAMPLES / "hh_prefs_test.jsonl"), max_samples=20)
    assert from_prefs.kept == 20 and all(r["prompt"][-1]["role"] == "user" for r in from_prefs.rows)


def test_shipped_train_and_test_samples_share_no_prompt():
    """The held-out files are never trained on: no test conversation starts like a train one."""
    def openings(name):
        rows = [json.loads(line) for line in (EXAMPLES / name).read_text(encoding="utf-8").splitlines()]
        return {json.dumps((r.get("messages") or r["prompt"])[0], ensure_ascii=False) for r in rows}

    train = openings("hh_prefs_train.jsonl") | openings("hh_prompts_train.jsonl")
    assert not train & (openings("hh_prefs_test.jsonl") | openings("hh_prompts_test.jsonl"))
    assert not openings("alpaca_sft_train.jsonl") & openings("alpaca_sft_test.jsonl")
    assert not openings("oasst_zh_prompts.jsonl") & (openings("oasst_zh_prefs.jsonl") | openings("oasst_zh_sft.jsonl"))


# ---------------------------------------------------------------------------------------------------------
# Train / eval split


def test_split_eval_keeps_each_prompts_pairs_on_one_side(tmp_path):
    rows = [{"prompt": f"q{i}", "responses": [f"a{j}" for j in range(2 + i % 3)]} for i in range(20)]
    ds = load_prefs(str(write_jsonl(tmp_path / "rk.jsonl", rows)))
    train, ev = split_eval(ds, 0.25, seed=0)
    train_groups, eval_groups = {r["group"] for r in train.rows}, {r["group"] for r in ev.rows}
    assert not train_groups & eval_groups
    assert len(eval_groups) == 5 and len(train_groups) == 15
    assert (train.prompts, ev.prompts) == (15, 5)
    assert train.kept + ev.kept == ds.kept
    train_prompts = {json.dumps(r["prompt"]) for r in train.rows}
    assert not train_prompts & {json.dumps(r["prompt"]) for r in ev.rows}
    assert split_eval(ds, 0.25, seed=0)[1].rows == ev.rows  # the seed decides
    assert split_eval(ds, 0.25, seed=1)[1].rows != ev.rows


def test_split_eval_sft_rows(tmp_path):
    ds = load_sft(str(write_jsonl(tmp_path / "s.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(10)])))
    train, ev = split_eval(ds, 0.2, seed=3)
    assert (train.kept, ev.kept) == (8, 2)
    assert sorted(r["messages"][0]["content"] for r in train.rows + ev.rows) == sorted(f"p{i}" for i in range(10))


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.1])
def test_split_eval_bad_fraction(tmp_path, fraction):
    ds = load_sft(str(write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "completion": "c"}] * 4)))
    with pytest.raises(DataError, match="expected a fraction between 0 and 1"):
        split_eval(ds, fraction, seed=0)


def test_split_eval_too_few_prompts(tmp_path):
    ds = load_prefs(str(write_jsonl(tmp_path / "one.jsonl", [{"prompt": "q", "responses": ["a", "b", "c"]}])))
    with pytest.raises(DataError, match="has only 1 prompts; too few to hold any out"):
        split_eval(ds, 0.5, seed=0)


# ---------------------------------------------------------------------------------------------------------
# Chinese, shipped samples of real data, shipped examples


def test_chinese_text_round_trips_unchanged(tmp_path):
    q, a, bad = "你好，请介绍一下长城。", "长城是中国古代的军事防御工程。\n\n全长两万多公里！", "不知道"
    sft = load_sft(str(write_jsonl(tmp_path / "zh.jsonl", [{"messages": [U(q), A(a)]}])))
    assert sft.rows[0]["messages"] == [U(q), A(a)]
    prefs = load_prefs(str(write_jsonl(tmp_path / "zhp.jsonl", [{"prompt": q, "chosen": a, "rejected": bad}])))
    assert (prefs.rows[0]["prompt"], prefs.rows[0]["chosen"], prefs.rows[0]["rejected"]) == ([U(q)], [A(a)], [A(bad)])
    p = tmp_path / "zh.csv"
    with p.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["prompt", "response"], [q, a]])
    assert load_sft(str(p)).rows[0]["messages"] == [U(q), A(a)]


def test_shipped_chinese_samples_unchanged():
    """Every row of the Chinese oasst1 samples comes out of the loader byte for byte as it is in the file."""
    def lines(name):
        return (EXAMPLES / name).read_bytes().splitlines()

    def dumped(row):
        return json.dumps(row, ensure_ascii=False).encode("utf-8")

    sft = load_sft(str(EXAMPLES / "oasst_zh_sft.jsonl"))
    assert [dumped(r) for r in sft.rows] == lines("oasst_zh_sft.jsonl")
    prefs = load_prefs(str(EXAMPLES / "oasst_zh_prefs.jsonl"))
    assert [dumped({k: p[k] for k in ("prompt", "chosen", "rejected")}) for p in prefs.rows] == lines(
        "oasst_zh_prefs.jsonl")
    prompts = load_prompts(str(EXAMPLES / "oasst_zh_prompts.jsonl"))
    assert [dumped(p) for p in prompts.rows] == lines("oasst_zh_prompts.jsonl")
    assert "\u674e\u767d" in sft.rows[0]["messages"][0]["content"]  # 李白: Chinese characters, not escapes


SHIPPED_SAMPLES = [  # file, loader, format, rows (every row is kept: the samples were cleaned when made)
    ("hh_prefs_train.jsonl", load_prefs, "explicit", 300),
    ("hh_prefs_test.jsonl", load_prefs, "explicit", 100),
    ("hh_prompts_train.jsonl", load_prompts, "prompts", 300),
    ("hh_prompts_test.jsonl", load_prompts, "prompts", 107),
    ("alpaca_sft_train.jsonl", load_sft, "messages", 300),
    ("alpaca_sft_test.jsonl", load_sft, "messages", 100),
    ("oasst_zh_sft.jsonl", load_sft, "messages", 100),
    ("oasst_zh_prefs.jsonl", load_prefs, "explicit", 100),
    ("oasst_zh_prompts.jsonl", load_prompts, "prompts", 100),
]


@pytest.mark.parametrize("name,load,fmt,rows", SHIPPED_SAMPLES, ids=[s[0] for s in SHIPPED_SAMPLES])
def test_shipped_samples_load_whole(name, load, fmt, rows):
    ds = load(str(EXAMPLES / name))
    assert (ds.format, ds.read, ds.kept, dict(ds.dropped)) == (fmt, rows, rows, {})
    assert jsonl_rows(EXAMPLES / name) == rows
    if load is load_prefs:
        assert ds.prompts == rows  # one pair per prompt
        assert all(r["chosen"] != r["rejected"] and r["prompt"][-1]["role"] == "user" for r in ds.rows)
    if load is load_sft:
        assert all(r["messages"][-1]["role"] == "assistant" for r in ds.rows)
    if load is load_prompts:
        assert all(r["prompt"][-1]["role"] == "user" for r in ds.rows)


def test_every_shipped_data_file_is_documented():
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    for f in EXAMPLES.iterdir():
        if f.suffix in (".jsonl", ".csv"):
            assert f"`{f.name}`" in readme, f.name


@pytest.mark.parametrize("name,fmt", [
    ("sft_messages.jsonl", "messages"), ("sft_alpaca.jsonl", "alpaca"),
    ("sft_prompt_completion.jsonl", "prompt-completion"), ("sft_prompt_response.csv", "prompt-response"),
    ("sft_transcript.jsonl", "transcript"), ("zh_sft.jsonl", "messages"),
])
def test_example_sft_files(name, fmt):
    ds = load_sft(str(EXAMPLES / name))
    assert ds.format == fmt
    if name.endswith(".jsonl"):
        assert ds.read == jsonl_rows(EXAMPLES / name)
    else:
        with (EXAMPLES / name).open(newline="", encoding="utf-8") as f:
            assert ds.read == len(list(csv.reader(f))) - 1
    assert ds.kept >= 1 and ds.kept + sum(ds.dropped.values()) == ds.read
    for r in ds.rows:
        assert r["messages"][-1]["role"] == "assistant"
        assert {m["role"] for m in r["messages"]} <= {"system", "user", "assistant"}


@pytest.mark.parametrize("name,fmt", [
    ("prefs_explicit.jsonl", "explicit"), ("prefs_implicit.jsonl", "implicit"), ("prefs_ranked.jsonl", "ranked"),
    ("zh_prefs.jsonl", "explicit"),
])
def test_example_pref_files(name, fmt):
    ds = load_prefs(str(EXAMPLES / name))
    assert ds.format == fmt
    assert ds.kept >= 1 and 1 <= ds.prompts <= ds.read
    for r in ds.rows:
        assert r["chosen"] != r["rejected"] and r["prompt"][-1]["role"] != "assistant"


def test_example_ranked_file_pair_counts():
    """Every row of the ranked example gives K-choose-2 pairs minus the ties it holds."""
    path = EXAMPLES / "prefs_ranked.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    expected, ties = 0, 0
    for r in rows:
        k = len(r.get("responses") or r.get("completions"))
        if "scores" in r:
            t = sum(c * (c - 1) // 2 for c in Counter(r["scores"]).values())
        elif "ranking" in r:
            t = sum(len(x) * (len(x) - 1) // 2 for x in r["ranking"] if isinstance(x, list))
        else:
            t = 0
        expected += k * (k - 1) // 2 - t
        ties += t
    ds = load_prefs(str(path))
    assert ds.kept == expected
    assert ds.dropped.get("tied pairs skipped", 0) == ties
    assert any("scores" in r for r in rows) and any("ranking" in r for r in rows)


def test_example_prompts_file():
    ds = load_prompts(str(EXAMPLES / "prompts.jsonl"))
    assert ds.kept >= 1 and all(r["prompt"][-1]["role"] == "user" for r in ds.rows)


@pytest.mark.parametrize("spec, expect", [
    ("org/prefs", ("org/prefs", None, "train")),
    ("org/prefs:test", ("org/prefs", None, "test")),
    ("org/prefs:harmless:test", ("org/prefs", "harmless", "test")),
])
def test_hub_dataset_names_map_to_name_config_split(spec, expect, monkeypatch):
    import datasets

    seen = []

    def fake_load(name, config=None, split=None):
        seen.append((name, config, split))
        return datasets.Dataset.from_list([{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ds = load_prefs(spec)
    assert seen == [expect]
    assert ds.kept == 1 and ds.rows[0]["chosen"] == [{"role": "assistant", "content": "Hello!"}]


def test_rows_shaped_like_the_hub_datasets_the_readme_names(tmp_path):
    """One row in the layout of each hub dataset the README says can be passed by name, extra columns included."""
    q = "Why is the sky blue?"

    def convo(answer):
        return [U(q), A(answer)]

    hh = {"chosen": f"\n\nHuman: {q}\n\nAssistant: Rayleigh scattering.",
          "rejected": f"\n\nHuman: {q}\n\nAssistant: Paint."}
    trl = {"chosen": convo("Rayleigh scattering."), "rejected": convo("Paint."), "score_chosen": 8.0,
           "score_rejected": 3.0}
    h4 = {"prompt": q, "prompt_id": "abc", "chosen": convo("Rayleigh scattering."), "rejected": convo("Paint."),
          "messages": convo("Rayleigh scattering."), "score_chosen": 8.0, "score_rejected": 3.0}
    for name, row, fmt in [("hh", hh, "implicit"), ("trl", trl, "implicit"), ("h4", h4, "explicit")]:
        ds = load_prefs(str(write_jsonl(tmp_path / f"{name}.jsonl", [row])))
        assert ds.format == fmt, name
        assert ds.rows[0]["prompt"] == [U(q)], name  # the prompt once, never repeated inside the answers
        assert (ds.rows[0]["chosen"], ds.rows[0]["rejected"]) == ([A("Rayleigh scattering.")], [A("Paint.")]), name
        assert load_prompts(str(tmp_path / f"{name}.jsonl")).rows == [{"prompt": [U(q)]}], name

    alpaca = {"instruction": "Name a colour.", "input": "", "output": "Blue.",
              "text": "Below is an instruction ... ### Response:\nBlue."}
    ds = load_sft(str(write_jsonl(tmp_path / "alpaca.jsonl", [alpaca])))
    assert ds.format == "alpaca" and ds.rows == [{"messages": [U("Name a colour."), A("Blue.")]}]
