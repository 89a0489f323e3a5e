"""data.py: the tokenizer (byte-level BPE and SentencePiece with LLaMA settings), conversations and their
loss masks, readers and their errors, the mixture, batches and their resumable order."""
import pytest
import torch

from data import Tokenizer

CORPUS = ["A chat between a curious human and an artificial intelligence assistant.",
          "The red square is left of the blue circle.", "Please provide the bounding box coordinate.",
          "There are 3 triangles in the image.", "What colour is the circle? It is green."] * 20


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.Train(input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), vocab_size=120,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    return d / "sp.model"


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory):
    from tokenizers import Tokenizer as T, models, pre_tokenizers, decoders, trainers
    tok = T(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.mark.parametrize("which", ["sp_model", "hf_json"])
def test_roundtrip_and_explicit_bos_eos(which, request):
    tok = Tokenizer(request.getfixturevalue(which))
    text = "The blue circle is left of the red square."
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == text
    full = tok.encode(text, bos=True, eos=True)
    assert full == [tok.bos_id] + ids + [tok.eos_id]
    assert tok.decode(full) == text
    assert max(full) < tok.vocab_size


def test_hf_json_matches_transformers(hf_json):
    from transformers import PreTrainedTokenizerFast
    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_json))
    tok = Tokenizer(hf_json)
    for text in CORPUS[:5]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    assert (tok.bos_id, tok.eos_id) == (ref.convert_tokens_to_ids("<s>"), ref.convert_tokens_to_ids("</s>"))


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model does not exist"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model: not a SentencePiece model"):
        Tokenizer(tmp_path / "bad.model")


# ----------------------------------------------------------------------------- conversations and batches

import json  # noqa: E402
from collections import Counter  # noqa: E402

from PIL import Image  # noqa: E402

import data as D  # noqa: E402
import world as W  # noqa: E402
from tiling import ImageLayout  # noqa: E402

LAYOUT = ImageLayout(canvas=128, grid=2, tokens_per_view=17)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    src = D.SampleSource([{"path": "synthetic", "ratio": 1}], seed=7, canvas=128, synthetic=W.synthetic_sample)
    texts = [D.prompt_text(src.next().turns + [("x", None)]) for _ in range(500)]
    return D.train_tokenizer(texts, 1024, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _target_spans(enc):
    """Runs of consecutive target tokens, decoded."""
    spans, cur = [], []
    for t in enc.targets:
        if t == D.IGNORE_INDEX:
            if cur:
                spans.append(cur)
            cur = []
        else:
            cur.append(t)
    return spans + ([cur] if cur else [])


def test_targets_decode_to_exactly_the_answers(bpe):
    for i in range(40):
        s = W.synthetic_sample(3, "train", i, 128)
        enc = D.encode(s, bpe, 1024, LAYOUT)
        spans = [bpe.decode(x) for x in _target_spans(enc)]
        assert spans == [" " + a + "\n###" for _, a in s.turns]
        assert enc.tokens[0] == bpe.bos_id and bpe.bos_id not in enc.tokens[1:]
        assert len(enc) == len(enc.tokens) + (LAYOUT.block_len(enc.tiles.fully_padded) if s.has_image else 0)


def test_known_conversation_layout(bpe):
    s = D.Sample([("What is 2 + 3?", "5."), ("And 4 + 4?", "8.")])
    enc = D.encode(s, bpe, 1024, LAYOUT)
    text = bpe.decode(enc.tokens)
    assert text == (D.SYSTEM + "\n\n### Human: What is 2 + 3?\n### Assistant: 5.\n### Human: And 4 + 4?"
                    "\n### Assistant: 8.\n###")
    # the target at position t is token t+1, and only inside answers
    for t, tgt in enumerate(enc.targets):
        assert tgt == D.IGNORE_INDEX or tgt == enc.tokens[t + 1]
    assert enc.tiles is None and enc.image_tokens == 0


def test_truncation_drops_trailing_turns_never_the_image(bpe):
    img = Image.new("RGB", (200, 100), (50, 60, 70))
    turns = [(f"Question number {i}?", f"Answer number {i}.") for i in range(6)]
    s = D.Sample(turns, image=img, source="x.json:3")
    full = D.encode(s, bpe, 4096, LAYOUT)
    cut = D.encode(s, bpe, len(full) - 5, LAYOUT)
    assert cut.image_tokens == full.image_tokens == 3 * 19 + 2
    assert [bpe.decode(x) for x in _target_spans(cut)] == [f" Answer number {i}.\n###" for i in range(5)]
    with pytest.raises(D.DataError, match=r"x.json:3: does not fit max_len 70 .*nothing left to learn"):
        D.encode(s, bpe, 70, LAYOUT)


def test_llava_json_jsonl_and_language_only(tmp_path, bpe):
    Image.new("RGB", (64, 32), (1, 2, 3)).save(tmp_path / "a.png")
    recs = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                 {"from": "gpt", "value": "A box [0.10, 0.20, 0.30, 0.40]."}]},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}]
    (tmp_path / "d.json").write_text(json.dumps(recs, indent=1))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    for name in ("d.json", "d.jsonl"):
        samples = D.load_dataset(tmp_path / name)
        assert samples[0].turns == [("What is it?", "A box [0.10, 0.20, 0.30, 0.40].")]
        assert samples[0].image_path == str(tmp_path / "a.png") and not samples[1].has_image
        enc = D.encode(samples[0], bpe, 512, LAYOUT)
        assert enc.tiles.fully_padded == [False, False, False, True, True]


BAD = {
    "malformed": ('{"conversations": [}\n', r"bad.jsonl:2: malformed JSON"),
    "no_answer": ('{"conversations": [{"from": "human", "value": "hi"}]}\n', r"bad.jsonl:2: record has no assistant turn"),
    "missing_image": ('{"image": "nope.jpg", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}\n',
                      r"bad.jsonl:2: image .*nope.jpg does not exist"),
    "box_outside": ('{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "[0.1, 0.2, 1.3, 0.5]"}]}\n',
                    r"bad.jsonl:2: box \[0.1, 0.2, 1.3, 0.5\] is outside \[0, 1\]"),
}
GOOD_LINE = '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}\n'


@pytest.mark.parametrize("case", BAD)
def test_bad_input_messages_and_skip_policy(case, tmp_path):
    line, message = BAD[case]
    (tmp_path / "bad.jsonl").write_text(GOOD_LINE + line + GOOD_LINE)
    with pytest.raises(D.DataError, match=message):
        D.load_dataset(tmp_path / "bad.jsonl")
    skips = D.Skips("skip")
    assert len(D.load_dataset(tmp_path / "bad.jsonl", skips=skips)) == 2
    assert skips.report().startswith("skipped 1 bad samples") and "bad.jsonl:2" in skips.report()


def test_unreadable_image_named_at_encode(tmp_path, bpe):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "broken.jpg", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}) + "\n")
    s = D.load_dataset(tmp_path / "d.jsonl")[0]
    with pytest.raises(D.DataError, match=r"d.jsonl:1: .*broken.jpg: not a readable image"):
        D.encode(s, bpe, 512, LAYOUT)


def test_mixture_ratios_hold(tmp_path):
    for name, n in (("a", 5), ("b", 7)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"conversations": [
            {"from": "human", "value": f"{name}{i}"}, {"from": "gpt", "value": "x"}]}) + "\n" for i in range(n)))
    (tmp_path / "mix.json").write_text(json.dumps({"datasets": [
        {"path": "a.jsonl", "ratio": 0.2}, {"path": "b.jsonl", "ratio": 0.5}, {"path": "synthetic", "ratio": 0.3}]}))
    src = D.SampleSource(D.read_mixture(tmp_path / "mix.json"), seed=1, canvas=128, synthetic=W.synthetic_sample)
    counts = Counter()
    for _ in range(10_000):
        s = src.next()
        counts["synthetic" if s.source.startswith("synthetic") else s.turns[0][0][0]] += 1
    for key, p in (("a", 0.2), ("b", 0.5), ("synthetic", 0.3)):
        sd = (p * (1 - p) / 10_000) ** 0.5
        assert abs(counts[key] / 10_000 - p) < 4 * sd, counts
    (tmp_path / "bad_mix.json").write_text('{"datasets": [{"path": "a.jsonl", "ratio": 0}]}')
    with pytest.raises(D.DataError, match="bad_mix.json: a.jsonl: ratio must be a number > 0, not 0"):
        D.read_mixture(tmp_path / "bad_mix.json")
    (tmp_path / "bad_mix.json").write_text('{"datasets": [{"path": "a.jsonl", "ratio": "lots"}]}')
    with pytest.raises(D.DataError, match="ratio must be a number > 0, not 'lots'"):
        D.read_mixture(tmp_path / "bad_mix.json")
    (tmp_path / "bad_mix.json").write_text('{"datasets": [{"ratio": 1}]}')
    with pytest.raises(D.DataError, match="bad_mix.json: expected"):
        D.read_mixture(tmp_path / "bad_mix.json")
    (tmp_path / "adir").mkdir()
    with pytest.raises(D.DataError, match="adir: is a directory, not a data file"):
        D.load_dataset(tmp_path / "adir")


def _ids(samples):
    return [s.source + "|" + s.turns[0][0] for s in samples]


def test_dp_shards_disjoint_complete_and_resume(bpe):
    def batcher(rank, world):
        return D.Batcher(D.SampleSource([{"path": "synthetic", "ratio": 1}], 5, 128, synthetic=W.synthetic_sample), bpe, LAYOUT, 512,
                         global_batch=8, rank=rank, world=world, window=3)
    single = batcher(0, 1)
    shards = [batcher(r, 2) for r in range(2)]
    for _ in range(7):                                     # crosses window boundaries
        whole = _ids(single.next_samples())
        parts = [_ids(b.next_samples()) for b in shards]
        assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(whole)
    # resume: a new batcher from the saved state gives the same next batches, on any DP size
    state = json.loads(json.dumps(single.state_dict()))
    expected = [single.next() for _ in range(4)]
    again = batcher(0, 1)
    again.load_state_dict(state)
    for e in expected:
        got = again.next()
        assert torch.equal(got["tokens"], e["tokens"]) and torch.equal(got["targets"], e["targets"])
    ref = batcher(0, 1)
    ref.load_state_dict(state)
    halves = [batcher(r, 2) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    for _ in range(4):
        whole = _ids(ref.next_samples())
        parts = [_ids(h.next_samples()) for h in halves]
        assert sorted(parts[0] + parts[1]) == sorted(whole)


@pytest.fixture(scope="module")
def llama_sp(tmp_path_factory):
    """A SentencePiece model with LLaMA's settings (BPE, identity normaliser, dummy prefix, byte
    fallback, digits split, whitespace kept), trained on rendered synthetic conversations."""
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("llama_sp")
    texts = [D.prompt_text(s.turns) for s in W.train_samples(5, 300, 128, 3)]
    (d / "corpus.txt").write_text("\n".join(t.replace("\n", " ") for t in texts))
    spm.SentencePieceTrainer.Train(input=str(d / "corpus.txt"), model_prefix=str(d / "llama"), vocab_size=600,
                                   model_type="bpe", normalization_rule_name="identity", add_dummy_prefix=True,
                                   byte_fallback=True, split_digits=True, remove_extra_whitespaces=False,
                                   allow_whitespace_only_pieces=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    return Tokenizer(d / "llama.model")


def test_sentencepiece_training_ids_are_the_inference_ids_for_every_turn(llama_sp):
    tok = llama_sp
    assert not tok.needs_space_before_segment                # LLaMA-style: the word-start marker is implicit
    differs = 0
    for i in range(30):
        s = W.synthetic_sample(7, "train", i, 128, tasks_per_image=3)
        enc = D.encode(s, tok, 4096, LAYOUT)
        assert enc.tokens == [tok.bos_id] + tok.encode(D.prompt_text(s.turns))        # encoded once
        for k, (q, a) in enumerate(s.turns):
            prompt = D.prompt_tokens(tok, s.turns[:k] + [(q, None)])
            assert enc.tokens[:len(prompt)] == prompt                                  # what inference sees
            answer = [t for t, tgt in zip(enc.tokens[len(prompt):], enc.targets[len(prompt) - 1:]) if tgt != D.IGNORE_INDEX]
            assert tok.decode(answer[:len(tok.encode_segment(a + "\n###"))]) == a + "\n###"
        per_segment = [tok.bos_id] + [i for t, _ in D.render(s.turns) for i in tok.encode(t)]
        differs += per_segment != enc.tokens
    assert differs == 30            # encoding each segment apart (the old way) puts stray '▁' tokens in


def test_reference_boxes_relative_to_the_centred_square_become_ours(tmp_path):
    # A 2:1 photo (200 x 100): the reference centres it in a 200 x 200 square, 50 px of padding above.
    Image.new("RGB", (200, 100), (9, 9, 9)).save(tmp_path / "wide.png")
    rec = {"image": "wide.png", "conversations": [
        {"from": "human", "value": "<image>Where is the cat? [0.50, 0.50]"},
        {"from": "gpt", "value": "[0.25, 0.25, 0.75, 0.75]"}]}
    (tmp_path / "ref.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "mix.json").write_text(json.dumps({"datasets": [{"path": "ref.jsonl", "ratio": 1, "boxes": "centered"}]}))
    src = D.SampleSource(D.read_mixture(tmp_path / "mix.json"), seed=0, canvas=448)
    s = src.datasets[0][0]
    # Photo pixels: x 50..150, y 0..100 (the square's 0.25..0.75 minus the 50 px offset); ours puts the
    # photo at the top-left of the 448 canvas, scaled by 448 / 200: x / 200, y / 200.
    assert s.turns == [("Where is the cat? [0.50, 0.25]", "[0.25, 0.00, 0.75, 0.50]")]
    (tmp_path / "bad.json").write_text(json.dumps({"datasets": [{"path": "ref.jsonl", "ratio": 1, "boxes": "pixels"}]}))
    with pytest.raises(D.DataError, match="boxes must be 'canvas' .* or 'centered'"):
        D.read_mixture(tmp_path / "bad.json")


def test_records_with_a_directory_image_or_an_unanswered_question_are_refused(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(D.DataError, match="x:1: image .*adir is a directory"):
        D.record_to_sample({"image": "adir", "conversations": [{"from": "human", "value": "q"},
                                                                 {"from": "gpt", "value": "a"}]}, "x:1", tmp_path)
    with pytest.raises(D.DataError, match="x:2: the conversation ends with a human turn nobody answers"):
        D.record_to_sample({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                                              {"from": "human", "value": "and?"}]}, "x:2", tmp_path)


def test_non_utf8_lines_and_pretty_printed_json_lists_are_named_by_line(tmp_path):
    good = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
    (tmp_path / "d.jsonl").write_bytes(json.dumps(good).encode() + b"\n" + b'{"conversations": "\xff\xfe"}\n'
                                       + json.dumps(good).encode() + b"\n")
    skips = D.Skips("skip")
    out = D.load_dataset(tmp_path / "d.jsonl", skips=skips)
    assert len(out) == 2 and len(skips.reasons) == 1 and "d.jsonl:2: not UTF-8 text (byte 0xff" in skips.reasons[0]
    with pytest.raises(D.DataError, match=r"d.jsonl:2: not UTF-8"):
        D.load_dataset(tmp_path / "d.jsonl")
    # A pretty-printed list: nested objects start lines too; each record is named by the line it starts on.
    bad = {"conversations": [{"from": "robot", "value": "x"}]}
    (tmp_path / "l.json").write_text(json.dumps([good, good, bad], indent=2))
    text = (tmp_path / "l.json").read_text()
    third = text.count("\n", 0, text.index('"robot"')) + 1 - 3             # the record's "{" is 3 lines above
    with pytest.raises(D.DataError, match=rf"l.json:{third}: unknown role 'robot'"):
        D.load_dataset(tmp_path / "l.json")
    (tmp_path / "b.json").write_bytes(b'[\n {"a": "\xc3"}\n]')
    with pytest.raises(D.DataError, match=r"b.json:2: not UTF-8 text"):
        D.load_dataset(tmp_path / "b.json")


def test_a_record_too_long_is_measured_once(tmp_path, bpe, monkeypatch):
    long = {"conversations": [{"from": "human", "value": "word " * 400}, {"from": "gpt", "value": "Ok."}]}
    short = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(long) + "\n" + json.dumps(short) + "\n")
    skips = D.Skips("skip")
    src = D.SampleSource([{"path": str(tmp_path / "d.jsonl"), "ratio": 1}], 0, 128, skips=skips)
    calls = []
    real = D.encode
    monkeypatch.setattr(D, "encode", lambda s, *a: (calls.append(s.source), real(s, *a))[1])
    b = D.Batcher(src, bpe, LAYOUT, 64, global_batch=2, window=2)
    for _ in range(6):
        b.next_micro(1)
    assert calls.count(f"{tmp_path / 'd.jsonl'}:1") == 1 and skips.draws == 6
    assert skips.report().startswith("skipped 1 bad samples, 6 draws")


def test_json_list_records_carry_their_line_and_bad_lists_name_theirs(tmp_path):
    recs = [{"conversations": [{"from": "human", "value": f"q{i}\nstill q"}, {"from": "gpt", "value": "a"}]} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(recs, indent=2))        # the value's \n stays escaped
    text = (tmp_path / "d.json").read_text()
    starts = [text[:text.index(f'"q{i}')].rfind("{\n    \"conversations\"") for i in range(3)]
    want = [text.count("\n", 0, s) + 1 for s in starts]
    got = list(D.read_records(tmp_path / "d.json"))
    assert [src.split(":")[-1] for src, _ in got] == [str(w) for w in want] and [r for _, r in got] == recs
    compact = json.dumps(recs)
    for bad, message in ((compact[:-1], r"malformed JSON \(expected ',' or '\]'\)"),
                         (compact + " []", "malformed JSON \\(extra data after the list\\)"),
                         ("\n\n" + compact.replace("}, {", "} {", 1), r"d.json:3: malformed JSON"),
                         ('{"a": 1}', "expected a JSON list of records"), ("", "malformed JSON")):
        (tmp_path / "d.json").write_text(bad)
        with pytest.raises(D.DataError, match=message):
            list(D.read_records(tmp_path / "d.json"))
