"""tools/mix.py: SPHINX's weight mix of two of our checkpoints: LLM blended, the rest kept, clear refusals."""
from dataclasses import replace

import pytest
import torch

from tools import mix
import loading as L
import model as M


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two 'tuned' checkpoints from one start: same encoders, different LLM weights (and projectors)."""
    d = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    a = M.build_sphinx(M.sphinx_config("tiny"))
    b = M.build_sphinx(M.sphinx_config("tiny"))
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    with torch.no_grad():
        for n, p in b.named_parameters():
            if n.startswith(("llm.", "mov.proj.")):
                p.add_(torch.randn_like(p) * 0.01)
    (d / "a").mkdir()
    (d / "b").mkdir()
    L.save_sphinx(d / "a" / "model.safetensors", a)
    L.save_sphinx(d / "b" / "model.safetensors", b)
    (d / "a" / "tokenizer.json").write_text("{}")
    return d, a, b


def test_mixes_the_llm_and_keeps_the_rest(two_runs, tmp_path):
    d, a, b = two_runs
    rc = mix.main([str(d / "a" / "model.safetensors"), str(d / "b" / "model.safetensors"), "--beta", "0.3",
                   "--out", str(tmp_path / "m" / "model.safetensors")])
    assert rc == 0 and (tmp_path / "m" / "tokenizer.json").exists()
    m = L.load_sphinx(tmp_path / "m" / "model.safetensors")
    sa, sb, sm = a.state_dict(), b.state_dict(), m.state_dict()
    for n in sm:
        if n.startswith("llm."):
            terms = (0.3 * sa[n].double(), 0.7 * sb[n].double())
            # Three fp32 roundings (two products, one sum), each within half an ulp of its operands.
            bound = 2.0 ** -23 * (terms[0].abs() + terms[1].abs()) * 1.5
            assert ((sm[n].double() - (terms[0] + terms[1])).abs() <= bound).all(), n
        else:                                        # encoders, projector, tags: a's, bit for bit
            assert torch.equal(sm[n], sa[n]), n
    assert not torch.equal(sm["llm.layers.0.attention.wq.weight"], sa["llm.layers.0.attention.wq.weight"])
    # beta 1 is a, beta 0 is b's LLM
    for beta, src in ((1.0, sa), (0.0, sb)):
        out = mix.mix_weights(a, b, beta).state_dict()
        assert all(torch.equal(out[n], src[n]) for n in out if n.startswith("llm."))


def test_refuses_other_configs_and_bad_beta(two_runs, tmp_path, capsys):
    d, a, _ = two_runs
    other = M.build_sphinx(replace(M.sphinx_config("tiny"), grid=1))
    L.save_sphinx(tmp_path / "other.safetensors", other)
    rc = mix.main([str(d / "a" / "model.safetensors"), str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert rc == 1 and "differ in configuration" in err and not (tmp_path / "x.safetensors").exists()
    rc = mix.main([str(d / "a" / "model.safetensors"), str(d / "b" / "model.safetensors"), "--beta", "1.5",
                   "--out", str(tmp_path / "x.safetensors")])
    assert rc == 1 and "beta must be in [0, 1]" in capsys.readouterr().err
    rc = mix.main([str(d / "a" / "model.safetensors"), str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "x.safetensors")])
    assert rc == 1 and "none.safetensors" in capsys.readouterr().err
