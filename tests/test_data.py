"""data.py: the tokenizer interface (conversations and batching come with issue 5)."""
import pytest

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
