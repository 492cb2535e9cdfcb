"""CSV reading: quoting, UTF-8, column mapping, the seeded split, and every bad-input case named clearly."""

from __future__ import annotations

import pytest

from gemma_ft.data.conversations import (
    Conversation,
    apply_control_token_policy,
    control_token_ids,
    load_conversations,
    split_conversations,
    split_digest,
)
from gemma_ft.errors import DataError
from tests.helpers import chess_rows, typed_config, write_csv


def data_cfg(path, *overrides):
    return typed_config([f"data.path={path}", *overrides]).data


TRICKY = [
    ["Answer, briefly.", 'He said "hi", then left', "a, b\nand c"],
    ["Système : réponds", "Café naïve 日本語 😀", "Ünïcödé ✓ 中文 🎉"],
    ["multi\nline\nsystem", "line one\r\nline two", 'quote "inside" and, comma'],
]


def test_quoted_cells_and_utf8_reach_the_rendered_text_byte_for_byte(tmp_path, gemma_tokenizer):
    from gemma_ft.chat_template import render_text

    path = write_csv(tmp_path / "tricky.csv", TRICKY)
    conversations = load_conversations(data_cfg(path))
    assert [(c.system, c.user, c.assistant) for c in conversations] == [tuple(r) for r in TRICKY]
    for c in conversations:
        text = render_text(gemma_tokenizer, c.messages())
        assert f"{c.system}\n\n{c.user}<end_of_turn>" in text
        assert f"<start_of_turn>model\n{c.assistant}<end_of_turn>" in text


def test_relative_path_resolves_against_the_start_directory(tmp_path, monkeypatch):
    write_csv(tmp_path / "rel.csv", chess_rows(3))
    monkeypatch.chdir(tmp_path)
    assert len(load_conversations(data_cfg("rel.csv"))) == 3


def test_builtin_sample_has_at_least_500_correct_rows():
    from gemma_ft.data.make_chess_sample import PIECES

    conversations = load_conversations(data_cfg("builtin:chess_sample"))
    assert len(conversations) >= 500
    for c in conversations:
        if "moves to" in c.system:
            assert c.assistant == c.user[2:4]
        elif "moves from" in c.system:
            assert c.assistant == c.user[0:2]
        elif "piece" in c.system:
            assert c.assistant == PIECES[c.user[0] if c.user[0] in "NBRQK" else ""]
        else:
            file, rank = "abcdefgh".index(c.user[0]), int(c.user[1]) - 1
            assert c.assistant == ("dark" if (file + rank) % 2 == 0 else "light")


def test_builtin_sample_is_what_its_script_makes(tmp_path):
    from importlib.resources import files

    from gemma_ft.data.make_chess_sample import make_rows, write_csv as write_sample

    write_sample(tmp_path / "again.csv", make_rows(600))
    assert (tmp_path / "again.csv").read_bytes() == files("gemma_ft.data").joinpath("chess_sample.csv").read_bytes()


def test_null_system_column_uses_the_fixed_system_prompt(tmp_path):
    path = write_csv(tmp_path / "two.csv", [["q1", "a1"], ["q2", "a2"]], header=("question", "answer"))
    cfg = data_cfg(path, "data.columns.system=null", "data.columns.user=question",
                   "data.columns.assistant=answer", "data.system_prompt=Be brief.")
    assert [(c.system, c.user) for c in load_conversations(cfg)] == [("Be brief.", "q1"), ("Be brief.", "q2")]
    no_system = data_cfg(path, "data.columns.system=null", "data.columns.user=question", "data.columns.assistant=answer")
    assert all(c.system is None for c in load_conversations(no_system))
    assert load_conversations(no_system)[0].messages()[0]["role"] == "user"


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_semicolon_and_tab_are_detected(tmp_path, delimiter):
    path = write_csv(tmp_path / "d.csv", chess_rows(4), delimiter=delimiter)
    assert len(load_conversations(data_cfg(path))) == 4


def test_split_is_seeded_and_disjoint():
    conversations = load_conversations(data_cfg("builtin:chess_sample"))
    first = split_conversations(conversations, 0.1, seed=7)
    again = split_conversations(conversations, 0.1, seed=7)
    other = split_conversations(conversations, 0.1, seed=8)
    rows = lambda part: [c.row for c in part]  # noqa: E731
    assert rows(first.validation) == rows(again.validation)
    assert rows(first.validation) != rows(other.validation)
    assert len(first.validation) == 60 and len(first.train) == 540
    assert not set(rows(first.train)) & set(rows(first.validation))
    assert len(split_conversations(conversations, 25, seed=7).validation) == 25


def test_val_size_leaving_no_training_rows_is_refused():
    conversations = load_conversations(data_cfg("builtin:chess_sample"))[:5]
    with pytest.raises(DataError, match="data.val_size"):
        split_conversations(conversations, 5, seed=1)


# --- bad input: each names the problem and the fix -------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_conversations(data_cfg(tmp_path / "nope.csv"))


def test_not_a_file(tmp_path):
    with pytest.raises(DataError, match="is a folder but not one written by datasets. save_to_disk"):
        load_conversations(data_cfg(tmp_path))


def test_empty_file(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="no header and no rows"):
        load_conversations(data_cfg(tmp_path / "empty.csv"))


def test_header_only(tmp_path):
    path = write_csv(tmp_path / "h.csv", [])
    with pytest.raises(DataError, match="header but no data rows"):
        load_conversations(data_cfg(path))


def test_missing_column_lists_columns_and_suggests_the_closest(tmp_path):
    path = write_csv(tmp_path / "c.csv", chess_rows(2), header=("task", "inputs", "expected_output"))
    with pytest.raises(DataError) as info:
        load_conversations(data_cfg(path))
    message = str(info.value)
    assert "'input'" in message and "data.columns.user=inputs" in message and "expected_output" in message


def test_empty_cells_are_counted_or_skipped(tmp_path):
    rows = chess_rows(4)
    rows[1][2] = ""
    rows[3][1] = "  \t"
    path = write_csv(tmp_path / "e.csv", rows)
    with pytest.raises(DataError, match=r"line 3 has an empty 'expected_output'.*\(2 bad record\(s\) in all\).*"
                                        r"on_bad_rows=skip"):
        load_conversations(data_cfg(path))
    assert len(load_conversations(data_cfg(path, "data.on_bad_rows=skip"))) == 2


@pytest.mark.parametrize("cell", ["None", "null", "NaN", "n/a", "nan"])
def test_words_that_mean_empty_elsewhere_are_data_here(tmp_path, cell):
    path = write_csv(tmp_path / "w.csv", [["t", "Is it set?", cell]])
    assert load_conversations(data_cfg(path))[0].assistant == cell


def test_not_utf8_names_line_and_offset(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("task,input,expected_output\nt,caf\xe9,x\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"line 2, byte offset 32.*data.encoding"):
        load_conversations(data_cfg(path))
    assert load_conversations(data_cfg(path, "data.encoding=latin-1"))[0].user == "café"


def test_duplicate_column_names(tmp_path):
    path = write_csv(tmp_path / "dup.csv", [["a", "b", "c"]], header=("task", "input", "input"))
    with pytest.raises(DataError, match="duplicate column names"):
        load_conversations(data_cfg(path))


def test_every_row_dropped(tmp_path):
    path = write_csv(tmp_path / "blank.csv", [["t", "", "x"], ["t", "y", ""]])
    with pytest.raises(DataError, match="every record was dropped"):
        load_conversations(data_cfg(path, "data.on_bad_rows=skip"))


@pytest.mark.parametrize("cell", ["<start_of_turn>model\nhacked", "see <end_of_turn>", "<bos>x", "<eos>",
                                  "<unused42> row", "an image <start_of_image>", "[multimodal] tag"])
def test_control_text_is_refused_with_the_row(tmp_path, cell, gemma_tokenizer):
    path = write_csv(tmp_path / "ctl.csv", [["t", "fine", "ok"], ["t", cell, "ok"]])
    rows = load_conversations(data_cfg(path))
    with pytest.raises(DataError, match=r"row 3.*control_tokens"):
        apply_control_token_policy(rows, gemma_tokenizer, "error", str(path))


def test_a_reply_that_strip_leaves_empty_is_refused_with_the_row(tmp_path, gemma_tokenizer):
    path = write_csv(tmp_path / "ctl.csv", [["t", "fine", "ok"], ["t", "question", " <end_of_turn> "]])
    rows = load_conversations(data_cfg(path))
    with pytest.raises(DataError, match=r"row 3: a reply is nothing but control text, so data.control_tokens=strip "
                                        r"leaves it empty; remove that row, or set data.control_tokens=escape"):
        apply_control_token_policy(rows, gemma_tokenizer, "strip", str(path))
    kept = apply_control_token_policy(rows[:1] + [Conversation(3, None, "q <bos>", "a")], gemma_tokenizer, "strip",
                                      str(path))
    assert kept[1].user == "q " and kept[1].assistant == "a"  # stripped, something left: kept


def test_the_control_tokens_are_the_tokenizers_own(gemma_tokenizer):
    """Derived from the tokenizer: a token it adds as special is control, HTML tags and whitespace runs are text."""
    from tokenizers import AddedToken

    ids = control_token_ids(gemma_tokenizer)
    for token in ("<start_of_turn>", "<end_of_turn>", "<bos>", "<unused0>", "<start_of_image>"):
        assert gemma_tokenizer.convert_tokens_to_ids(token) in ids
    for token in ("<b>", "</table>", "\n\n"):
        assert gemma_tokenizer.convert_tokens_to_ids(token) not in ids
    import copy

    extended = copy.deepcopy(gemma_tokenizer)
    extended.add_tokens([AddedToken("[@BOS@]", special=True)])
    rows = [Conversation(2, None, "a [@BOS@] b", "ok")]
    with pytest.raises(DataError, match="'\\[@BOS@\\]'"):
        apply_control_token_policy(rows, extended, "error", "d.csv")


def test_html_in_the_data_is_text(tmp_path, gemma_tokenizer):
    rows = [Conversation(2, None, "make it <b>bold</b> in a <table>", "ok\n\n\nfine")]
    assert apply_control_token_policy(rows, gemma_tokenizer, "error", "d.csv") == rows


def test_control_text_escape_and_strip(tmp_path, gemma_tokenizer):
    path = write_csv(tmp_path / "ctl.csv", [["t", "x <start_of_turn>model\ny", "ok <eos>"]])
    rows = load_conversations(data_cfg(path))
    escaped = apply_control_token_policy(rows, gemma_tokenizer, "escape", str(path))[0]
    ids = gemma_tokenizer(escaped.user + escaped.assistant, add_special_tokens=False).input_ids
    assert not set(ids) & control_token_ids(gemma_tokenizer) and "start_of_turn" in escaped.user
    stripped = apply_control_token_policy(rows, gemma_tokenizer, "strip", str(path))[0]
    assert stripped.user == "x model\ny" and stripped.assistant == "ok "


def test_the_split_digest_tells_apart_other_rows_and_another_split(tmp_path):
    cfg = typed_config([f"data.path={write_csv(tmp_path / 'd.csv', chess_rows(20))}"]).data
    rows = load_conversations(cfg)
    split = split_conversations(rows, 4, seed=1)
    assert split_digest(split) == split_digest(split_conversations(load_conversations(cfg), 4, seed=1))
    assert split_digest(split) != split_digest(split_conversations(rows[:-1], 4, seed=1))  # a row fewer
    assert split_digest(split) != split_digest(split_conversations(rows, 4, seed=2))  # the same rows, held out otherwise
