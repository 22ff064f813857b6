"""Tokenizers for the server: a checkpoint's ``tokenizer.json`` or a byte-level fallback.

The fallback maps UTF-8 bytes to ids ``OFFSET + byte`` (ids 0..2 are pad / eos /
bos as in the project's random checkpoints), so any model with a vocabulary of at
least ``OFFSET + 256`` ids can be served. ``write_byte_tokenizer_json`` writes the
same mapping as a Hugging Face ``tokenizer.json`` (byte-level BPE without merges)
for external tools that need a tokenizer (guidellm counts tokens with one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

OFFSET = 3  # ids 0, 1, 2: pad, eos, bos (the project's checkpoints, wicore.model.checkpoint.hf_config)


class Tokenizer(Protocol):
    bos_id: int | None
    stop_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special and unknown ids are dropped."""
        ...

    def special_id(self, token: str) -> int | None:
        """Id of a special token such as ``<end_of_turn>``, or None."""
        ...


class ByteTokenizer:
    """UTF-8 bytes -> ``OFFSET + byte``; invalid UTF-8 decodes to U+FFFD."""

    def __init__(self, vocab_size: int, bos_id: int | None = 2, eos_ids: tuple[int, ...] = (1,)) -> None:
        if vocab_size < OFFSET + 256:
            raise ValueError(f"byte tokenizer: vocab_size {vocab_size} < {OFFSET + 256}")
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.stop_ids = tuple(eos_ids)

    def encode(self, text: str) -> list[int]:
        return [b + OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - OFFSET for i in ids if OFFSET <= i < OFFSET + 256).decode("utf-8", errors="replace")

    def special_id(self, token: str) -> int | None:
        return None


class HFTokenizer:
    """A ``tokenizer.json`` through the ``tokenizers`` library."""

    def __init__(self, path: str | Path, bos_id: int | None = None, eos_ids: tuple[int, ...] = ()) -> None:
        from tokenizers import Tokenizer as _Tok

        self.tok = _Tok.from_file(str(path))
        self.bos_id = bos_id
        stops = list(eos_ids)
        for name in ("<end_of_turn>", "<|eot_id|>", "<|end_of_text|>", "<eos>"):
            i = self.tok.token_to_id(name)
            if i is not None and i not in stops:
                stops.append(i)
        self.stop_ids = tuple(stops)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))

    def special_id(self, token: str) -> int | None:
        i = self.tok.token_to_id(token)
        return None if i is None else int(i)


class StreamDecoder:
    """Incremental detokenizer: ``push`` returns the new text; the pieces concatenate to
    ``decode(all ids)`` (text that may still change, e.g. a partial UTF-8 character, is held)."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.sent = ""

    def push(self, ids: list[int], final: bool = False) -> str:
        self.ids.extend(ids)
        text = self.tok.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            return ""
        if not text.startswith(self.sent):  # a tokenizer re-spelled earlier text: wait for it to settle
            return ""
        new = text[len(self.sent):]
        self.sent = text
        return new


def _checkpoint_special_ids(ckpt: Path) -> tuple[int | None, tuple[int, ...]]:
    bos: int | None = None
    eos: list[int] = []
    for name in ("generation_config.json", "config.json"):
        f = ckpt / name
        if not f.exists():
            continue
        data = json.loads(f.read_text())
        if bos is None and isinstance(data.get("bos_token_id"), int):
            bos = data["bos_token_id"]
        e = data.get("eos_token_id")
        for i in e if isinstance(e, list) else [e]:
            if isinstance(i, int) and i not in eos:
                eos.append(i)
    return bos, tuple(eos)


def load_tokenizer(vocab_size: int, checkpoint: str | Path | None = None,
                   tokenizer_json: str | Path | None = None) -> Tokenizer:
    """``tokenizer_json`` if given, else the checkpoint's ``tokenizer.json``, else the byte fallback."""
    bos: int | None = 2
    eos: tuple[int, ...] = (1,)
    if checkpoint is not None:
        b, e = _checkpoint_special_ids(Path(checkpoint))
        bos, eos = (b if b is not None else bos), (e or eos)
        if tokenizer_json is None and (Path(checkpoint) / "tokenizer.json").exists():
            tokenizer_json = Path(checkpoint) / "tokenizer.json"
    if tokenizer_json is not None:
        return HFTokenizer(tokenizer_json, bos, eos)
    return ByteTokenizer(vocab_size, bos, eos)


def write_byte_tokenizer_json(out_dir: str | Path, model_max_length: int = 512) -> Path:
    """Write the byte fallback as a Hugging Face tokenizer (``tokenizer.json`` + ``tokenizer_config.json``):
    byte-level BPE without merges, byte ``b`` -> id ``OFFSET + b``, specials <pad>=0, <eos>=1, <bos>=2."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = _bytes_to_unicode()
    assert sorted(alphabet) == sorted(byte_chars.values())
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    vocab.update({byte_chars[b]: OFFSET + b for b in range(256)})
    tok = _Tok(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
           "pad_token": "<pad>", "model_max_length": model_max_length, "add_bos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out / "tokenizer.json"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ``ByteLevel`` uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}
