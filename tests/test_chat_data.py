"""Chat data: JSONL / JSON / Parquet / saved datasets, the messages and ShareGPT forms, multi-turn labels, and a
one-line error for every malformed file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gemma_ft.data.conversations import load_conversations
from gemma_ft.errors import DataError
from tests.helpers import typed_config

CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 日本語 😀"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And code?"},
     {"role": "assistant", "content": "def f():\n    return  1"}],
    [{"role": "user", "content": "One turn only"}, {"role": "assistant", "content": "Fine, one."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}],
]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def data_cfg(path, *overrides):
    return typed_config([f"data.path={path}", *overrides]).data


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def as_sharegpt(chat):
    return {"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in chat]}


def test_multi_turn_labels_decode_to_exactly_the_assistant_turns(tmp_path, gemma_tokenizer):
    from gemma_ft.data.encoding import encode_conversations, trained_label_spans

    conversations = load_conversations(data_cfg(write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in CHATS])))
    assert [c.messages() for c in conversations] == CHATS
    rows = encode_conversations(gemma_tokenizer, conversations, max_seq_length=4096)
    for chat, labels in zip(CHATS, rows.labels):
        replies = [m["content"] + "<end_of_turn>\n" for m in chat if m["role"] == "assistant"]
        assert [gemma_tokenizer.decode(span) for span in trained_label_spans(labels)] == replies
    assert rows.replies_cut_off == 0


def test_a_cut_conversation_keeps_its_whole_earlier_turns_and_counts_the_cut_reply(tmp_path, gemma_tokenizer):
    from gemma_ft.chat_template import render_text
    from gemma_ft.data.encoding import encode_conversations, trained_label_spans

    conversations = load_conversations(data_cfg(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHATS[2]}])))
    # cut just before the last reply: "f" and its end of turn are gone, the earlier replies stay whole
    prompt = render_text(gemma_tokenizer, conversations[0].messages(include_reply=False), add_generation_prompt=True)
    cut = len(gemma_tokenizer(prompt).input_ids)
    rows = encode_conversations(gemma_tokenizer, conversations, max_seq_length=cut)
    assert [gemma_tokenizer.decode(s) for s in trained_label_spans(rows.labels[0])] == ["b<end_of_turn>\n",
                                                                                         "d<end_of_turn>\n"]
    assert rows.replies_cut_off == 1 and rows.dropped_too_long == 0


def test_every_file_kind_reads_to_the_same_conversations(tmp_path):
    import datasets

    expected = load_conversations(data_cfg(write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in CHATS])))
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [as_sharegpt(c) for c in CHATS])
    (tmp_path / "list.json").write_text(json.dumps([{"messages": c} for c in CHATS]), encoding="utf-8")
    dataset = datasets.Dataset.from_list([{"messages": c} for c in CHATS])
    dataset.to_parquet(str(tmp_path / "c.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "saved_dict"))
    for path in (sharegpt, tmp_path / "list.json", tmp_path / "c.parquet", tmp_path / "saved", tmp_path / "saved_dict"):
        got = load_conversations(data_cfg(path))
        assert [c.messages() for c in got] == [c.messages() for c in expected], path


def test_flat_jsonl_rows_use_the_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "flat.jsonl", [{"q": "2+2?", "a": 4}, {"q": "None?", "a": "None"}])
    got = load_conversations(data_cfg(path, "data.columns.system=null", "data.columns.user=q",
                                      "data.columns.assistant=a"))
    assert [(c.user, c.assistant) for c in got] == [("2+2?", "4"), ("None?", "None")]


BAD_FILES = {
    "bad_json": ('{"messages": []}\n{"messages": [oops\n', r"c\.jsonl: line 2: not valid JSON"),
    "wrong_role": ([{"messages": [{"role": "bot", "content": "x"}]}], r"line 1 turn 1 has role 'bot'; use one of"),
    "two_users": ([{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                 {"role": "assistant", "content": "c"}]}],
                  r"line 1 has two user turns in a row \(turns 1 and 2\)"),
    "empty_content": ([{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "c"}]}],
                      r"line 1 turn 1 \(user\) has an empty"),
    "missing_field": ([{"chat": []}], r"line 1 has no field 'messages' \(data.columns.messages\)"),
    "ends_with_user": ([{"messages": [{"role": "user", "content": "a"}]}], r"line 1 ends with a user turn"),
    "late_system": ([{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                                   {"role": "assistant", "content": "c"}]}], r"line 1 has a system message at turn 2"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_malformed_chat_files_name_the_line_and_the_fix(tmp_path, case):
    content, pattern = BAD_FILES[case]
    path = tmp_path / "c.jsonl"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        write_jsonl(path, content)
    with pytest.raises(DataError, match=pattern):
        load_conversations(data_cfg(path, "data.format=messages"))


def test_bad_records_are_skipped_and_counted_when_asked(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHATS[1]}, {"messages": [{"role": "user", "content": "a"}]},
                                              {"messages": CHATS[2]}])
    with pytest.raises(DataError, match=r"line 2 ends with a user turn.*\(1 bad record\(s\) in all\)"):
        load_conversations(data_cfg(path))
    assert [c.row for c in load_conversations(data_cfg(path, "data.on_bad_rows=skip"))] == [1, 3]


def test_a_malformed_file_stops_the_command_with_one_line_and_exit_2(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"messages": [}\n', encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "gemma_ft", "model=tiny", f"data.path={path}",
                             f"run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "c.jsonl" in line]
    assert lines and "line 1: not valid JSON" in lines[0] and "Traceback" not in result.stderr


def test_the_packaged_multi_turn_sample_is_deterministic_and_correct():
    from gemma_ft.data.make_multi_turn_sample import colour, make_conversations
    from gemma_ft.data.conversations import resolve_data_path

    conversations = load_conversations(typed_config(["data=multi_turn_sample"]).data)
    assert len(conversations) == 300 and all(len(c.history) in (1, 2) for c in conversations)
    shipped = resolve_data_path("builtin:multi_turn_sample").read_text(encoding="utf-8").splitlines()
    assert shipped == [json.dumps(c, ensure_ascii=False) for c in make_conversations(300)]
    for c in conversations:
        move = c.history[0][0].split()[3]
        assert c.history[0][1] == move[:2]
        replies = [a for _, a in c.history] + [c.assistant]
        if len(replies) == 3:
            assert replies[1] == move[2:4] and replies[2] == colour(move[2:4])


def test_control_text_in_an_earlier_turn_is_refused_or_escaped(tmp_path, gemma_tokenizer):
    from gemma_ft.data.conversations import apply_control_token_policy, control_token_ids

    chat = [dict(m) for m in CHATS[2]]
    chat[1]["content"] = "b <end_of_turn> b"  # an earlier assistant turn
    conversations = load_conversations(data_cfg(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHATS[1]},
                                                                                   {"messages": chat}])))
    with pytest.raises(DataError, match=r"row 2.*control_tokens"):
        apply_control_token_policy(conversations, gemma_tokenizer, "error", "c.jsonl")
    escaped = apply_control_token_policy(conversations, gemma_tokenizer, "escape", "c.jsonl")[1]
    assert escaped.assistant == "f" and escaped.history[0][1] != chat[1]["content"]
    ids = gemma_tokenizer(escaped.history[0][1], add_special_tokens=False).input_ids
    assert not set(ids) & control_token_ids(gemma_tokenizer)


def test_the_multi_turn_sample_trains_packed_with_examples_shown_per_turn(tmp_path, capsys):
    from gemma_ft.pipeline import run
    from tests.helpers import TINY

    metrics = run(typed_config([*TINY, "data=multi_turn_sample", "data.val_size=4", "train.batching=packed",
                                "train.tokens_per_step=512", "train.max_steps=2", "debug.show_examples=true"]),
                  run_dir=tmp_path / "run")
    assert metrics["batching"] == "packed" and metrics["global_step"] == 2 and metrics["eval_loss"] > 0
    assert metrics["replies_cut_off"] == {"train": 0, "eval": 0}
    samples = json.loads((tmp_path / "run" / "samples.json").read_text())
    assert len(samples) == 2 and all(s["expected"] in ("light", "dark") or len(s["expected"]) == 2 for s in samples)
    shown = capsys.readouterr().out
    assert "row " in shown and "reply 1: '" in shown and "reply 2: '" in shown and "Conversation(" not in shown


def test_json_files_refuse_nan_values_and_deep_nesting_with_the_line(tmp_path):
    """Python's json reads NaN (the reply would become the text "nan") and raises RecursionError on deep nesting."""
    nan = tmp_path / "nan.jsonl"
    nan.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": NaN}]}\n')
    with pytest.raises(DataError, match=r"nan.jsonl: line 1: NaN is not a JSON value"):
        load_conversations(data_cfg(nan))
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"deep.jsonl: line 2: nested too deeply to read"):
        load_conversations(data_cfg(deep))


def test_a_json_list_with_a_byte_order_mark_reads_as_without_it(tmp_path):
    chats = [{"messages": c} for c in CHATS]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(chats), encoding="utf-8")
    marked = tmp_path / "marked.json"
    marked.write_text(json.dumps(chats), encoding="utf-8-sig")
    assert marked.read_bytes().startswith(b"\xef\xbb\xbf")
    as_text = [[m for m in c.messages()] for c in load_conversations(data_cfg(plain))]
    assert [[m for m in c.messages()] for c in load_conversations(data_cfg(marked))] == as_text


def test_a_data_path_that_is_a_symlink_loop_is_one_data_error(tmp_path):
    (tmp_path / "a.jsonl").symlink_to(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").symlink_to(tmp_path / "a.jsonl")
    with pytest.raises(DataError, match="a.jsonl.* cannot be followed"):
        load_conversations(data_cfg(tmp_path / "a.jsonl"))


def test_a_file_argument_that_is_a_symlink_loop_is_named_before_anything_loads(tmp_path):
    from gemma_ft.commands import data_file_problems

    (tmp_path / "a.jsonl").symlink_to(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").symlink_to(tmp_path / "a.jsonl")
    [problem] = data_file_problems("file", str(tmp_path / "a.jsonl"))
    assert problem.startswith("file=") and "cannot be followed" in problem
