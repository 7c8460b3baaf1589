"""LLaSA's chat framing (model.framing=llasa_chat), rendered through the base model's own chat
template, as LLaSA's official training code builds its sequences::

    chat = [{"role": "user", "content": "Convert the text to speech:<|TEXT_UNDERSTANDING_START|>"},
            {"role": "assistant", "content": "<|SPEECH_GENERATION_START|>"}]
    ids = tokenizer.apply_chat_template(chat, tokenize=True)
    # TEXT_UNDERSTANDING_START -> TEXT_UNDERSTANDING_START, text, TEXT_UNDERSTANDING_END
    # SPEECH_GENERATION_START  -> SPEECH_GENERATION_START, speech, SPEECH_GENERATION_END
    # labels: the ids from SPEECH_GENERATION_START to the end; pad (= eos) positions ignored

Around the two placeholders the rendering is constant, so it is rendered once (with a fixed
``date_string``: Llama-3.x templates stamp today's date otherwise) and split into three id
pieces that every sample shares. Jinja runs sandboxed, with the same settings transformers uses.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

USER_PROMPT = "Convert the text to speech:"
TEXT_START = "<|TEXT_UNDERSTANDING_START|>"
SPEECH_START = "<|SPEECH_GENERATION_START|>"


class ChatTemplateError(ValueError):
    pass


@dataclass(frozen=True)
class ChatFrame:
    """The constant id pieces around [TEXT_UNDERSTANDING_START text TEXT_UNDERSTANDING_END] and
    [SPEECH_GENERATION_START speech SPEECH_GENERATION_END]."""

    before_text: tuple[int, ...]
    between: tuple[int, ...]
    after_speech: tuple[int, ...]
    eos_id: int  # LLaSA pads with eos and ignores pad positions: an eos is never a target

    @property
    def extra(self) -> int:
        return len(self.before_text) + len(self.between) + len(self.after_speech)

    def prompt(self, text_part: list[int], speech_start: int) -> list[int]:
        """The generation prompt: everything up to and including SPEECH_GENERATION_START."""
        return list(self.before_text) + text_part + list(self.between) + [speech_start]


def render(template: str, messages: list[dict], date: str, special: dict[str, str]) -> str:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"the chat template refused: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_k: json.dumps(x, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=False, date_string=date,
                                            **special)


def _token_text(value) -> str:
    return value.get("content", "") if isinstance(value, dict) else (value or "")


def llasa_chat_frame(tokenizer_file: str, date: str) -> ChatFrame:
    """Render LLaSA's framing with the chat template of the tokenizer_config.json beside
    ``tokenizer_file`` and split it into ChatFrame pieces (ids of the text tokenizer)."""
    from tokenizers import Tokenizer

    cfg_path = os.path.join(os.path.dirname(tokenizer_file), "tokenizer_config.json")
    try:
        with open(cfg_path) as f:
            tcfg = json.load(f)
    except FileNotFoundError:
        raise ChatTemplateError(f"model.framing=llasa_chat needs the chat template of the base model: "
                                f"{cfg_path} is missing") from None
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        raise ChatTemplateError(f"{cfg_path} holds no chat_template (a base, not an instruct, tokenizer?)")
    special = {"bos_token": _token_text(tcfg.get("bos_token")), "eos_token": _token_text(tcfg.get("eos_token"))}
    text = render(template, [{"role": "user", "content": USER_PROMPT + TEXT_START},
                             {"role": "assistant", "content": SPEECH_START}], date, special)
    if text.count(TEXT_START) != 1 or text.count(SPEECH_START) != 1:
        raise ChatTemplateError("the chat template does not keep the user and assistant contents verbatim")
    head, rest = text.split(TEXT_START)
    middle, tail = rest.split(SPEECH_START)
    tok = Tokenizer.from_file(tokenizer_file)

    def ids(s: str) -> tuple[int, ...]:
        return tuple(tok.encode(s, add_special_tokens=False).ids)

    eos = tok.token_to_id(special["eos_token"]) if special["eos_token"] else None
    if eos is None:
        raise ChatTemplateError(f"{cfg_path}: eos_token {special['eos_token']!r} is not in the tokenizer")
    return ChatFrame(ids(head), ids(middle), ids(tail), eos)
