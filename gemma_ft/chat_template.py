"""The Gemma 3 chat template: set it on the tokenizer, then prove it renders what training relies on."""

from __future__ import annotations

from gemma_ft.errors import TemplateError

USER_TURN = "<start_of_turn>user\n"
MODEL_TURN = "<start_of_turn>model\n"
END_OF_TURN = "<end_of_turn>"

_PROBE = [
    {"role": "system", "content": "probe system"},
    {"role": "user", "content": "probe question"},
    {"role": "assistant", "content": "probe answer"},
]
_EXPECTED_PROBE = (
    f"{USER_TURN}probe system\n\nprobe question{END_OF_TURN}\n{MODEL_TURN}probe answer{END_OF_TURN}\n"
)


def apply_gemma3_template(tokenizer):
    """Give the tokenizer unsloth's Gemma 3 chat template and check it; returns the tokenizer to use."""
    from unsloth.chat_templates import get_chat_template

    tokenizer = get_chat_template(tokenizer, chat_template="gemma-3")
    verify_gemma3_template(tokenizer)
    return tokenizer


def verify_gemma3_template(tokenizer) -> None:
    """Raise TemplateError unless a probe conversation renders as Gemma 3 and tokenises as training expects."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template; gemma_ft sets the Gemma 3 one before use")
    rendered = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    if rendered.removeprefix(tokenizer.bos_token or "") != _EXPECTED_PROBE:
        raise TemplateError(
            f"the chat template renders {rendered!r}, expected Gemma 3's {_EXPECTED_PROBE!r}: "
            "the model's tokenizer is not a Gemma 3 tokenizer"
        )
    for marker in ("<start_of_turn>", END_OF_TURN):
        ids = tokenizer.encode(marker, add_special_tokens=False)
        if len(ids) != 1:
            raise TemplateError(
                f"{marker} tokenises to {len(ids)} tokens {ids}, not one: the tokenizer lacks Gemma 3's special "
                "tokens (use the model's own tokenizer)"
            )
    ids = tokenizer(render_text(tokenizer, _PROBE)).input_ids
    if tokenizer.bos_token_id is not None and ids[:2] == [tokenizer.bos_token_id] * 2:
        raise TemplateError("training text starts with two BOS tokens; the rendered text must not keep its <bos>")


def render_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Rendered conversation without its leading <bos>: the trainer's tokenizer adds the BOS itself."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return text.removeprefix(tokenizer.bos_token or "")
