"""One-stage all-in-one data (paper Sec. 3.2), in pipeline order: tokenizer, the conversation template
and encoding, readers and the mixture, the sample stream, length-grouped data-parallel batches and
collate. The built-in synthetic multi-task world and its evaluation are in world.py.

The tokenizer is one small interface over the two file formats LLM checkpoints ship:
a SentencePiece `.model` (LLaMA-2, TinyLlama, Mixtral, InternLM2) and a HF
`tokenizer.json`. BOS and EOS are never added implicitly: the caller says where they go,
because the image block is spliced in right after BOS.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from tiling import (ImageError, ImageLayout, Tiles, centered_to_photo, labelled_boxes, load_image, map_boxes,
                    photo_to_canvas)


class Tokenizer:
    def __init__(self, path, bos: str | None = None, eos: str | None = None):
        """path: a SentencePiece .model or a HF tokenizer.json. bos/eos: token strings, needed
        only for a tokenizer.json whose BOS/EOS are not among the usual names."""
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"tokenizer file {self.path} does not exist")
        if self.path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer
            try:
                self._hf = HFTokenizer.from_file(str(self.path))
            except Exception as e:   # tokenizers raises its own exception type for a bad file
                raise ValueError(f"{self.path}: not a readable tokenizer.json ({e})") from None
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            self.bos_id = self._find(bos, ["<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>"])
            self.eos_id = self._find(eos, ["</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"])
        else:
            import sentencepiece as spm
            self._sp = spm.SentencePieceProcessor()
            try:
                self._sp.Load(str(self.path))
            except Exception as e:   # sentencepiece raises bare OSError/RuntimeError on a bad file
                raise ValueError(f"{self.path}: not a SentencePiece model ({e})") from None
            self._hf = None
            self.vocab_size = self._sp.GetPieceSize()
            self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
            if self.bos_id < 0 or self.eos_id < 0:
                raise ValueError(f"{self.path}: SentencePiece model has no BOS/EOS ids")

    def _find(self, explicit, candidates) -> int:
        for tok in ([explicit] if explicit else candidates):
            i = self._hf.token_to_id(tok)
            if i is not None:
                return i
        raise ValueError(f"{self.path}: none of {[explicit] if explicit else candidates} is a token; "
                         "pass bos=/eos= explicitly")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._sp.EncodeAsIds(text) if self._sp else self._hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + list(ids) + ([self.eos_id] if eos else [])

    def encode_segment(self, text: str) -> list[int]:
        """A piece cut from a longer text, tokenised as it appears inside that text (the reference's
        encode_segment): LLaMA-style SentencePiece adds the word-start marker by itself, while a
        byte-level BPE needs the space that precedes the piece."""
        text = text.lstrip(" ")
        return self.encode(" " + text if self.needs_space_before_segment else text)

    @property
    def needs_space_before_segment(self) -> bool:
        if not hasattr(self, "_space"):       # probed once, as the reference does
            whole, tail = self.encode("Hi my darling"), self.encode("my darling")
            self._space = whole[-len(tail):] != tail
        return self._space

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self._sp.DecodeIds(ids) if self._sp else self._hf.decode(ids, skip_special_tokens=True)


def train_tokenizer(texts, vocab_size: int, path) -> Tokenizer:
    """A byte-level BPE trained on `texts`, saved as a HF tokenizer.json (the CPU sizes' tokenizer).

    Byte-level: any text round-trips exactly, so the decoded targets equal the answers.
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return Tokenizer(path)


# ----------------------------------------------------------------------------- conversations

IGNORE_INDEX = -100
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
SEP = "###"
REC_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {}."


class DataError(ValueError):
    """Bad input, named by file and line."""


@dataclass
class Sample:
    turns: list[tuple[str, str]]                  # (human, assistant) pairs, <image> already stripped
    task: str = "text"
    source: str = ""                              # "file:line" or "synthetic:split:index", for messages
    image: Image.Image | None = None              # an RGB image, or
    image_path: str | None = None                 # a file opened when the sample is encoded
    image_size: tuple[int, int] | None = None     # (w, h) if known without decoding
    truth: dict = field(default_factory=dict)     # ground truth for evaluation (synthetic data)

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.image_path is not None

    def load_image(self) -> Image.Image | None:
        if self.image is None and self.image_path is not None:
            try:
                return load_image(self.image_path)
            except ImageError as e:
                raise DataError(f"{self.source}: {e}") from None
        return self.image


def render(turns) -> list[tuple[str, bool]]:
    """Conversation -> (text, is_target) segments in the reference template (conv_v1_2):
    {system}\\n\\n### Human: {q}\\n### Assistant: {a}\\n### Human: ... Only ' {a}\\n###' are targets."""
    segs, prefix = [], SYSTEM + "\n\n" + SEP
    for q, a in turns:
        segs.append((prefix + " Human: " + q + "\n" + SEP + " Assistant:", False))
        if a is None:
            break
        segs.append((" " + a + "\n" + SEP, True))
        prefix = ""
    return segs


def prompt_text(turns) -> str:
    """The rendered conversation as one text; with the last answer None, the prompt that precedes it."""
    return "".join(t for t, _ in render(turns))


def prompt_tokens(tok: Tokenizer, turns) -> list[int]:
    """BOS + the rendered prompt, ready for generation (the last answer of `turns` is None)."""
    return [tok.bos_id] + tok.encode(prompt_text(turns))


@dataclass
class Encoded:
    tokens: list[int]             # BOS + text (the image block is spliced in by the model after BOS)
    targets: list[int]            # next-token targets aligned with tokens, IGNORE_INDEX where no loss
    tiles: Tiles | None
    image_tokens: int
    task: str
    source: str

    def __len__(self):
        return len(self.tokens) + self.image_tokens


def encode(sample: Sample, tok: Tokenizer, max_len: int, layout: ImageLayout) -> Encoded:
    """Tokenise with loss only on assistant answers; drop trailing turns to fit max_len (counting the
    image block); raise DataError if not even the first answer fits."""
    img = sample.load_image()
    tiles = layout.tile(img) if img is not None else None
    n_img = layout.block_len(tiles.fully_padded) if tiles is not None else 0
    for n_turns in range(len(sample.turns), 0, -1):          # drop trailing turns until it fits
        tokens, is_target = tokenize_conversation(tok, sample.turns[:n_turns], sample.source)
        if n_img + len(tokens) <= max_len:
            break
    else:
        raise DataError(f"{sample.source}: does not fit max_len {max_len} even with one turn "
                        f"({n_img} image tokens); nothing left to learn")
    targets = [t if tgt else IGNORE_INDEX for t, tgt in zip(tokens[1:], is_target[1:])] + [IGNORE_INDEX]
    return Encoded(tokens, targets, tiles, n_img, sample.task, sample.source)


def tokenize_conversation(tok: Tokenizer, turns, source: str = "", prefix: str = "") -> tuple[list[int], list[bool]]:
    """BOS + the whole rendered conversation encoded once, as the reference does, so training ids are
    the ids the model later sees at inference; each answer ('{a}\\n###') is found in them by the
    reference's sub-list search, and its tokens are the targets. prefix: text before the conversation
    (the LLM base reads the scene written out there)."""
    segs = render(turns)
    tokens = [tok.bos_id] + tok.encode(prefix + "".join(t for t, _ in segs))
    is_target, pos = [False] * len(tokens), 1
    for text, is_t in segs:
        if is_t:
            value = tok.encode_segment(text)
            at = find_sublist(tokens, value, pos)
            if at < 0:
                raise DataError(f"{source}: an answer tokenises differently inside the conversation ({text.strip()!r})")
            is_target[at:at + len(value)] = [True] * len(value)
            pos = at + len(value)
    return tokens, is_target


def find_sublist(a: list, b: list, start: int = 0) -> int:
    """First index >= start where b occurs in a, or -1."""
    for i in range(start, len(a) - len(b) + 1):
        if a[i:i + len(b)] == b:
            return i
    return -1


def estimate_len(sample: Sample, tok: Tokenizer, layout: ImageLayout) -> int:
    """Length without decoding the image (for length-grouped batching)."""
    n = 1 + sum(len(tok.encode(t)) for t, _ in render(sample.turns))
    if sample.has_image:
        size = sample.image_size or (sample.image.size if sample.image is not None else None)
        n += layout.block_len_for_size(*size) if size else 0
    return n


# ----------------------------------------------------------------------------- readers

def check_boxes(text: str, source: str):
    for _, vals in labelled_boxes(text):
        if any(v < 0 or v > 1 for v in vals):
            raise DataError(f"{source}: box {vals} is outside [0, 1] (boxes are normalised canvas coordinates)")


def record_to_sample(rec, source: str, image_root: Path | None, boxes: str = "canvas", canvas: int = 448) -> Sample:
    """A LLaVA-style record {"image"?, "conversations": [{"from": "human"|"gpt", "value"}]} -> Sample.
    boxes "centered": the record's boxes are relative to the photo centred in a padded square (the
    reference's datasets); they are rewritten into ours (photo at the top-left of the canvas)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
        raise DataError(f"{source}: record has no 'conversations' list")
    image_path = None
    if rec.get("image"):
        image_path = str((image_root or Path(".")) / rec["image"])
        if not Path(image_path).exists():
            raise DataError(f"{source}: image {image_path} does not exist")
        if Path(image_path).is_dir():
            raise DataError(f"{source}: image {image_path} is a directory, not an image file")
    convert = _centered_box_converter(image_path, source, canvas) if boxes == "centered" else None
    turns, q = [], None
    for msg in rec["conversations"]:
        if not isinstance(msg, dict) or not isinstance(msg.get("value"), str):
            raise DataError(f"{source}: a conversation message has no string 'value'")
        role, text = msg.get("from"), msg["value"].replace("<image>", "").strip()
        if convert:
            text = map_boxes(text, convert)
        check_boxes(text, source)
        if role in ("human", "user"):
            q = text if q is None else q + "\n" + text
        elif role in ("gpt", "assistant"):
            if q is None:
                raise DataError(f"{source}: an assistant turn comes before any human turn")
            turns.append((q, text))
            q = None
        else:
            raise DataError(f"{source}: unknown role {role!r} (expected human or gpt)")
    if not turns:
        raise DataError(f"{source}: record has no assistant turn, nothing to learn")
    if q is not None:
        raise DataError(f"{source}: the conversation ends with a human turn nobody answers")
    return Sample(turns, task=rec.get("task", "image" if image_path else "text"), source=source, image_path=image_path)


def _centered_box_converter(image_path, source: str, canvas: int):
    """A box or point relative to the centred padded square -> our canvas coordinates."""
    if image_path is None:
        raise DataError(f"{source}: boxes relative to the centred square need the record's image")
    try:
        with Image.open(image_path) as im:         # the header only: no decoding
            size = im.size
    except Exception as e:                         # PIL raises many types for a bad file
        raise DataError(f"{source}: {image_path}: not a readable image ({e})") from None

    return lambda vals: photo_to_canvas(centered_to_photo(vals, size), size, canvas)


JSON_SPACE = re.compile(r"[ \t\r\n]*")       # what JSON allows between tokens


def read_records(path):
    """(source "file:line", record) pairs from a JSON list or a JSONL file. A bad line of a JSONL file
    (malformed JSON, bytes that are not UTF-8) becomes a DataError in its place, so skip mode can skip it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a data file")
    raw = path.read_bytes()
    if path.suffix == ".jsonl":
        for i, line in enumerate(raw.split(b"\n"), 1):
            if line.strip():
                try:
                    yield f"{path}:{i}", json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as e:
                    yield f"{path}:{i}", DataError(f"{path}:{i}: not UTF-8 text (byte {line[e.start]:#04x} at column {e.start + 1})")
                except json.JSONDecodeError as e:
                    yield f"{path}:{i}", DataError(f"{path}:{i}: malformed JSON ({e.msg})")
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x})") from None
    # One pass over the list's top-level items with the decoder: each record and the line it starts on.
    decoder, records = json.JSONDecoder(), []
    skip = lambda i: JSON_SPACE.match(text, i).end()
    try:
        pos = skip(0)
        if text[pos:pos + 1] != "[":
            decoder.decode(text)                              # a malformed file reports its own error
            raise DataError(f"{path}: expected a JSON list of records")
        pos, line = skip(pos + 1), 1
        while text[pos:pos + 1] != "]":
            if records:
                if text[pos:pos + 1] != ",":
                    raise json.JSONDecodeError("expected ',' or ']'", text, pos)
                pos = skip(pos + 1)
            line += text.count("\n", records[-1][2] if records else 0, pos)
            rec, end = decoder.raw_decode(text, pos)
            records.append((line, rec, pos))
            pos = skip(end)
        if skip(pos + 1) != len(text):
            raise json.JSONDecodeError("extra data after the list", text, skip(pos + 1))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    for line, rec, _ in records:
        yield f"{path}:{line}", rec


class Skips:
    """Bad-input policy: 'error' raises the first DataError; 'skip' counts them for the final report."""

    def __init__(self, policy: str = "error"):
        if policy not in ("error", "skip"):
            raise ValueError(f"policy must be 'error' or 'skip', not {policy!r}")
        self.policy, self.reasons, self.draws = policy, [], 0

    def handle(self, err: DataError):
        if self.policy == "error":
            raise err
        # Counted per record: a bad record drawn again (a later epoch) is the same problem, said once.
        self.draws += 1
        if str(err) not in self.reasons:
            self.reasons.append(str(err))

    def report(self) -> str:
        again = f", {self.draws} draws" if self.draws > len(self.reasons) else ""
        return (f"skipped {len(self.reasons)} bad samples{again}" + "".join(f"\n  {r}" for r in self.reasons[:10]))


def load_dataset(path, image_root=None, skips: Skips | None = None, boxes: str = "canvas", canvas: int = 448) -> list[Sample]:
    skips = skips or Skips()
    out = []
    for source, rec in read_records(path):
        try:
            if isinstance(rec, DataError):
                raise rec
            out.append(record_to_sample(rec, source, Path(image_root) if image_root else Path(path).parent,
                                        boxes, canvas))
        except DataError as e:
            skips.handle(e)
    return out


def read_mixture(path) -> list[dict]:
    """A mixture file: {"datasets": [{"path": ..., "ratio": 0.7, "image_root": ...}, ...]}.
    `path` may be "synthetic" for the built-in data. Paths are relative to the mixture file."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read mixture ({e})") from None
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) and "path" in e for e in entries):
        raise DataError(f"{path}: expected {{'datasets': [{{'path', 'ratio' > 0}}, ...]}}")
    for e in entries:
        try:
            ok = float(e.get("ratio", 0)) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise DataError(f"{path}: {e['path']}: ratio must be a number > 0, not {e.get('ratio')!r}")
    for e in entries:
        if e.get("boxes", "canvas") not in ("canvas", "centered"):
            raise DataError(f"{path}: {e['path']}: boxes must be 'canvas' (ours) or 'centered' (the reference's "
                            f"padded square), not {e['boxes']!r}")
        if e["path"] != "synthetic":
            e["path"] = str(path.parent / e["path"])
            if e.get("image_root"):
                e["image_root"] = str(path.parent / e["image_root"])
    return entries


# ----------------------------------------------------------------------------- streams and batches

class SampleSource:
    """An endless, seeded stream from a mixture of datasets drawn by ratio. Its state is three small
    lists, so a run can save and resume its exact position. A dataset whose path is "synthetic" is
    generated, not read: `synthetic(seed, split, index, canvas, tasks_per_image)` makes its samples
    (world.synthetic_sample; passed in, so this pipeline knows nothing of that world)."""

    def __init__(self, entries: list[dict], seed: int, canvas: int, split: str = "train", skips: Skips | None = None,
                 synthetic=None):
        if synthetic is None and any(e["path"] == "synthetic" for e in entries):
            raise DataError('the mixture names the "synthetic" dataset but no generator was given for it')
        self.seed, self.canvas, self.split, self.entries, self.synthetic = seed, canvas, split, entries, synthetic
        self.skips = skips or Skips()
        self.datasets = [e["path"] if e["path"] == "synthetic" else
                         load_dataset(e["path"], e.get("image_root"), self.skips, e.get("boxes", "canvas"), canvas)
                         for e in entries]
        for e, ds in zip(entries, self.datasets):
            if ds != "synthetic" and not ds:
                raise DataError(f"{e['path']}: no usable records")
        total = sum(float(e.get("ratio", 1.0)) for e in entries)
        self.cum = [sum(float(e.get("ratio", 1.0)) for e in entries[:i + 1]) / total for i in range(len(entries))]
        self.draws, self.cursors, self.epochs = 0, [0] * len(entries), [0] * len(entries)
        self._perm = {}

    def _order(self, i: int) -> list[int]:
        key = (i, self.epochs[i])
        if key not in self._perm:
            self._perm = {key: random.Random(f"{self.seed}:perm:{i}:{self.epochs[i]}").sample(
                range(len(self.datasets[i])), len(self.datasets[i]))}
        return self._perm[key]

    def next(self) -> Sample:
        u = random.Random(f"{self.seed}:mix:{self.draws}").random()
        i = next(j for j, c in enumerate(self.cum) if u < c or j == len(self.cum) - 1)
        self.draws += 1
        ds, k = self.datasets[i], self.cursors[i]
        self.cursors[i] += 1
        if ds == "synthetic":
            return self.synthetic(self.seed, self.split, k, self.canvas, int(self.entries[i].get("tasks_per_image", 1)))
        sample = ds[self._order(i)[k]]
        if self.cursors[i] == len(ds):
            self.cursors[i], self.epochs[i] = 0, self.epochs[i] + 1
        return sample

    def state_dict(self) -> dict:
        return {"draws": self.draws, "cursors": list(self.cursors), "epochs": list(self.epochs)}

    def load_state_dict(self, s: dict):
        self.draws, self.cursors, self.epochs = s["draws"], list(s["cursors"]), list(s["epochs"])


class Batcher:
    """Length-grouped global batches, each split across data-parallel ranks (rank r takes samples
    r, r + world, ...: disjoint and complete). A window of `window` global batches is drawn, sorted
    by length, cut into batches and shuffled; the state (the source state at the window's start and
    the batches consumed) does not depend on the number of ranks, so a run can resume on another DP size."""

    def __init__(self, source: SampleSource, tok: Tokenizer, layout: ImageLayout, max_len: int,
                 global_batch: int, rank: int = 0, world: int = 1, window: int = 8):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} does not split over {world} data-parallel ranks")
        self.source, self.tok, self.layout, self.max_len = source, tok, layout, max_len
        self.global_batch, self.rank, self.world, self.window = global_batch, rank, world, window
        self.batches, self.consumed, self.window_state = [], 0, source.state_dict()
        self.unusable: dict[str, DataError] = {}      # record source -> why it cannot be encoded

    def _fill(self):
        self.window_state, self.consumed = self.source.state_dict(), 0
        pool = [self.source.next() for _ in range(self.window * self.global_batch)]
        pool.sort(key=lambda s: estimate_len(s, self.tok, self.layout))
        self.batches = [pool[i:i + self.global_batch] for i in range(0, len(pool), self.global_batch)]
        random.Random(f"{self.source.seed}:window:{self.window_state['draws']}").shuffle(self.batches)

    def next_samples(self) -> list[Sample]:
        """This rank's samples of the next global batch."""
        if self.consumed == len(self.batches):
            self._fill()
        batch = self.batches[self.consumed]
        self.consumed += 1
        return batch[self.rank::self.world]

    def next(self) -> dict:
        """This rank's share of the next global batch, encoded and collated."""
        return self.next_micro(1)[0]

    def next_micro(self, n_micro: int) -> list[dict]:
        """The same, split into n_micro micro-batches for gradient accumulation."""
        encoded = []
        for s in self.next_samples():
            if s.source in self.unusable:       # measured once: a bad record is not re-read every epoch
                self.source.skips.handle(self.unusable[s.source])
                continue
            try:
                encoded.append(encode(s, self.tok, self.max_len, self.layout))
            except DataError as e:
                if s.source and not s.source.startswith("synthetic:"):
                    self.unusable[s.source] = e
                self.source.skips.handle(e)
        # Always n_micro micro-batches, empty ones included: every DP rank must run the same number of
        # gradient reductions whatever it skipped, or the collectives stop matching and the job hangs.
        per = max(1, -(-len(encoded) // n_micro))
        return [collate(encoded[i * per:(i + 1) * per], self.tok) for i in range(n_micro)]

    def state_dict(self) -> dict:
        return {"source": self.window_state, "consumed": self.consumed}

    def load_state_dict(self, s: dict):
        self.source.load_state_dict(s["source"])
        self._fill()
        self.consumed = s["consumed"]


def collate(encoded: list[Encoded], tok: Tokenizer) -> dict:
    """Right-padded tokens and targets; the model splices each image block in after BOS."""
    T = max((len(e.tokens) for e in encoded), default=1)
    pad = tok.eos_id
    return {
        "tokens": torch.tensor([e.tokens + [pad] * (T - len(e.tokens)) for e in encoded], dtype=torch.long).view(-1, T),
        "targets": torch.tensor([e.targets + [IGNORE_INDEX] * (T - len(e.targets)) for e in encoded],
                                dtype=torch.long).view(-1, T),
        "images": [e.tiles for e in encoded],
        "n_samples": len(encoded),
        "n_tokens": sum(len(e) for e in encoded),              # real positions, image blocks included
        "n_targets": sum(t != IGNORE_INDEX for e in encoded for t in e.targets),
    }
