"""Conversations -> token ids and labels: the loss is on every assistant turn and on nothing else.

gemma_ft owns the labels (rather than masking the trainer's dataset afterwards) so that padded batches, packed
batches, `debug.show_examples` and `gemma_ft.evaluate` all train and score exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from gemma_ft.chat_template import MODEL_TURN, USER_TURN, render_text

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedRows:
    """Token ids and labels of the conversations that keep at least one trained token."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    kept: list[int]  # index into the conversations given, per encoded row
    dropped_too_long: int  # rows whose every reply token was cut off by max_seq_length
    replies_cut_off: int = 0  # replies (assistant turns) of the kept rows with no token left after the cut

    def dataset(self):
        from datasets import Dataset

        return Dataset.from_dict({"input_ids": self.input_ids, "labels": self.labels})


def marker_ids(tokenizer, marker: str) -> list[int]:
    return tokenizer.encode(marker, add_special_tokens=False)


def response_labels(input_ids: list[int], user_marker: list[int], model_marker: list[int]) -> list[int]:
    """Labels that train every token after a model-turn marker up to the next user-turn marker.

    For Gemma 3 that is each reply, its `<end_of_turn>` and the newline closing the turn; the markers themselves,
    the system text and the user turns get IGNORE_INDEX. Markers are matched as token sequences: the control-token
    policy keeps them out of the data's own text.
    """
    labels = [IGNORE_INDEX] * len(input_ids)
    start = model_marker[0]
    assert user_marker[0] == start, "both Gemma 3 turn markers begin with <start_of_turn>"
    training, i, n = False, 0, len(input_ids)
    while i < n:
        if input_ids[i] == start:
            if input_ids[i:i + len(model_marker)] == model_marker:
                training, i = True, i + len(model_marker)
                continue
            if input_ids[i:i + len(user_marker)] == user_marker:
                training, i = False, i + len(user_marker)
                continue
        if training:
            labels[i] = input_ids[i]
        i += 1
    return labels


def encode_conversations(tokenizer, conversations, max_seq_length: int) -> EncodedRows:
    """Chat-template text tokenised once (one BOS, no EOS after the closing "<end_of_turn>\\n"), cut to
    max_seq_length, with response-only labels; rows left without a trained token are dropped and counted."""
    texts = [render_text(tokenizer, c.messages()) for c in conversations]
    user_marker, model_marker = marker_ids(tokenizer, USER_TURN), marker_ids(tokenizer, MODEL_TURN)
    input_ids, labels, kept, replies_cut_off = [], [], [], 0
    for index, ids in enumerate(tokenizer(texts).input_ids):
        ids = ids[:max_seq_length]
        row_labels = response_labels(ids, user_marker, model_marker)
        trained_replies = len(trained_label_spans(row_labels))
        if trained_replies:
            input_ids.append(ids)
            labels.append(row_labels)
            kept.append(index)
            replies_cut_off += len(conversations[index].history) + 1 - trained_replies
    return EncodedRows(input_ids, labels, kept, len(conversations) - len(kept), replies_cut_off)


def trained_label_spans(labels: list[int]) -> list[list[int]]:
    """The trained labels, one list per contiguous run: one per assistant turn that kept a token."""
    spans: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(label)
        previous = label
    return spans
