"""The text side of a model: tokenizer.json, the prompt template and where the image tokens go."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer

from vlmc.errors import VlmcError, first_line

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


@dataclass(frozen=True)
class PromptIds:
    """A prompt as token ids, split around the image so runners can prefill segment by segment.

    An image split into tiles (SmolVLM's tile grid) fills several runs of `num_image_tokens` image rows
    each, with the template's text `between` consecutive runs (the tile separators)."""

    before: list[int]
    after: list[int]
    num_image_tokens: int
    image_token_id: int
    between: tuple = ()

    @property
    def runs(self) -> int:
        """Image runs (tiles) in the prompt."""
        return len(self.between) + 1

    @property
    def texts(self) -> list[list[int]]:
        """The text pieces around the image runs: before, between each pair, after."""
        return [self.before, *self.between, self.after]

    @property
    def text_ids(self) -> list[int]:
        """Every text piece's ids, in order (what one token_embedding call embeds)."""
        return [t for text in self.texts for t in text]

    @property
    def image_rows(self) -> int:
        return self.runs * self.num_image_tokens

    def run_rows(self) -> tuple[tuple[int, int], ...]:
        """Each image run's rows [a, b) in the whole prompt."""
        runs, a = [], 0
        for text in self.texts[:-1]:
            a += len(text)
            runs.append((a, a + self.num_image_tokens))
            a += self.num_image_tokens
        return tuple(runs)

    @property
    def ids(self) -> list[int]:
        ids = list(self.before)
        for text in (*self.between, self.after):
            ids += [self.image_token_id] * self.num_image_tokens + list(text)
        return ids

    def __len__(self) -> int:
        return sum(len(t) for t in self.texts) + self.image_rows


def _template_bos(post_processor) -> Optional[str]:
    """The special token a tokenizer.json post-processor puts first in a single sequence, if any
    (transformers 5 writes the BOS rule there instead of `add_bos_token` in tokenizer_config.json)."""
    if not isinstance(post_processor, dict):
        return None
    if post_processor.get("type") == "Sequence":
        found = [_template_bos(p) for p in post_processor.get("processors", [])]
        return next((f for f in found if f), None)
    if post_processor.get("type") == "TemplateProcessing":
        single = post_processor.get("single") or []
        if single and "SpecialToken" in single[0]:
            return single[0]["SpecialToken"]["id"]
    if post_processor.get("type") in ("BertProcessing", "RobertaProcessing"):
        return (post_processor.get("cls") or [None])[0]
    return None


class TextTokenizer:
    """A Hugging Face tokenizer.json, with its BOS rule: `add_bos_token` of tokenizer_config.json where it
    is written (transformers 4), else the post-processor of tokenizer.json (transformers 5)."""

    def __init__(self, directory: Path):
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise VlmcError(f"{directory}: no tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises bare Exceptions with its parser message
            raise VlmcError(f"{path}: not a readable tokenizer.json ({first_line(e)})") from None
        cfg_path = directory / "tokenizer_config.json"
        try:
            cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        except json.JSONDecodeError as e:
            raise VlmcError(f"{cfg_path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(cfg, dict):
            raise VlmcError(f"{cfg_path}: expected a JSON object")
        bos_piece = _template_bos(json.loads(self._tok.to_str()).get("post_processor"))
        self.bos_id: Optional[int] = self._tok.token_to_id(bos_piece) if bos_piece else None
        self.add_bos = bool(cfg["add_bos_token"]) if "add_bos_token" in cfg else self.bos_id is not None
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def piece(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id) or ""

    def token_id(self, piece: str):
        return self._tok.token_to_id(piece)

    def unknown_words(self, text: str) -> list[str]:
        """Words of `text` that the vocabulary maps to its unknown token (WordLevel tokenizers)."""
        model = json.loads(self._tok.to_str())["model"]
        unk = model.get("unk_token")
        if model.get("type") != "WordLevel" or unk is None:
            return []
        pre = self._tok.pre_tokenizer.pre_tokenize_str(text) if self._tok.pre_tokenizer else [(w, None) for w in text.split()]
        return [w for w, _ in pre if self._tok.token_to_id(w) is None]

    def prompt(self, template: str, prompt: str, num_image_tokens: int, image_token_id: int, bos_token_id) -> PromptIds:
        """The prompt's ids; each `<image>` of the template is one image run (tile) of `num_image_tokens`."""
        text = template.replace("{prompt}", prompt)
        if IMAGE_PLACEHOLDER not in text:
            raise VlmcError(f"prompt template must contain {IMAGE_PLACEHOLDER}: {template!r}")
        before, *between, after = text.split(IMAGE_PLACEHOLDER)
        bos_token_id = self.bos_id if self.bos_id is not None else bos_token_id
        bos = [bos_token_id] if self.add_bos and bos_token_id is not None else []
        return PromptIds(bos + self.encode(before), self.encode(after), num_image_tokens, image_token_id,
                         tuple(self.encode(t) for t in between))
