"""Folding a chain of LoRA adapters into one (bread_ray.lineage.fold_lineage) on the tiny model:
the folded adapter gives the logits of merging the chain in turn."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from bread_ray.lineage import UnfoldableAdapter, fold_adapters, fold_lineage, write_adapter
from bread_ray.model_sources import ModelNotFoundError
from bread_ray.models import download_folded_adapter, load_causal_lm, load_teacher
from bread_ray.records import Lineage
from bread_ray.store import LocalStore
from bread_ray.tiny import build_random_lora

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Three bakes as a chain might hold them: other ranks, alphas and targets, rsLoRA, per-module patterns.
CHAIN = [
    {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    {"r": 2, "lora_alpha": 6, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
    {"r": 3, "lora_alpha": 5, "target_modules": ["o_proj", "up_proj", "down_proj"],
     "rank_pattern": {"down_proj": 5}, "alpha_pattern": {"o_proj": 7}},
]
CHAIN_RANK = 4 + 2 + 5  # each adapter's largest module rank


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def chain_dirs(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chain")
    return [build_random_lora(tiny_model, folder / f"bake{i}", i, **lora) for i, lora in enumerate(CHAIN)]


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def merged_in_turn(model_dir, adapter_dirs):
    """The reference: the base with each adapter merged in, base-most first."""
    model = load_causal_lm(model_dir, device="cpu")
    for adapter_dir in adapter_dirs:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model


def with_adapter(model_dir, adapter_dir):
    """The base with the adapter applied by PEFT, not merged."""
    return PeftModel.from_pretrained(load_causal_lm(model_dir, device="cpu"), adapter_dir).eval()


def assert_same_logits(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_folded_chain_gives_the_logits_of_merging_in_turn(tiny_model, chain_dirs, input_ids, tmp_path):
    folded = fold_lineage(chain_dirs, tmp_path / "folded")
    expected = logits(merged_in_turn(tiny_model, chain_dirs), input_ids)
    assert_same_logits(logits(with_adapter(tiny_model, folded), input_ids), expected)
    assert_same_logits(logits(with_adapter(tiny_model, folded).merge_and_unload(), input_ids), expected)
    for left_out in range(len(chain_dirs)):  # every bake moves the logits: the comparison can fail
        rest = chain_dirs[:left_out] + chain_dirs[left_out + 1:]
        assert (expected - logits(merged_in_turn(tiny_model, rest), input_ids)).abs().max() > 1.0


def test_folded_adapter_has_the_summed_rank_and_zero_blocks_where_a_bake_did_not_reach(chain_dirs):
    config, state = fold_adapters(chain_dirs)
    assert config["r"] == config["lora_alpha"] == CHAIN_RANK and not config["use_rslora"]
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    modules = [f"model.layers.{layer}.{kind}.{name}" for layer in range(2) for name in LINEAR
               for kind in (["self_attn"] if name in LINEAR[:4] else ["mlp"])]
    assert config["target_modules"] == sorted(modules)  # explicit names, not "all-linear"
    assert len(state) == 2 * len(modules)
    for module in modules:
        a = state[f"base_model.model.{module}.lora_A.weight"]
        b = state[f"base_model.model.{module}.lora_B.weight"]
        assert a.dtype == b.dtype == torch.float32
        assert a.shape[0] == b.shape[1] == CHAIN_RANK and (b @ a).abs().max() > 0
        assert a[:4].abs().min() > 0 and b[:, :4].abs().min() > 0  # bake 0 reached every module
        assert bool(a[4:6].any()) == module.endswith(("q_proj", "v_proj"))  # bake 1: q, v only
        rank_2 = {"down_proj": 5, "o_proj": 3, "up_proj": 3}.get(module.rsplit(".", 1)[1], 0)  # bake 2
        assert bool(a[6:6 + rank_2].all()) and not a[6 + rank_2:].any()
    # block i is s_i * A_i: bake 1 is rsLoRA, s = 6 / sqrt(2); bake 2's o_proj has alpha 7, s = 7 / 3
    saved = [load_file(d / "adapter_model.safetensors") for d in chain_dirs]
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    o = "base_model.model.model.layers.0.self_attn.o_proj"
    torch.testing.assert_close(state[f"{q}.lora_A.weight"][4:6],
                               saved[1][f"{q}.lora_A.weight"] * 6 / 2 ** 0.5)
    torch.testing.assert_close(state[f"{o}.lora_A.weight"][6:9], saved[2][f"{o}.lora_A.weight"] * 7 / 3)
    torch.testing.assert_close(state[f"{o}.lora_B.weight"][:, 6:9], saved[2][f"{o}.lora_B.weight"])


def test_a_chain_of_one(tiny_model, chain_dirs, input_ids, tmp_path):
    adapter = chain_dirs[1]  # rsLoRA: folding it moves its scaling into A
    expected = logits(with_adapter(tiny_model, adapter), input_ids)
    copied = fold_lineage([adapter], tmp_path / "copied")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (copied / name).read_bytes() == (adapter / name).read_bytes()
    config, state = fold_adapters([adapter])  # the fold itself gives the same adapter
    assert config["r"] == config["lora_alpha"] == 2 and not config["use_rslora"]
    folded = write_adapter(config, state, tmp_path / "folded")
    assert_same_logits(logits(with_adapter(tiny_model, folded), input_ids), expected)


def biased_model(tiny_model, out_dir):
    """The tiny model with biases on its attention projections, to bake bias="all" / "lora_only" on."""
    config = Qwen3Config.from_pretrained(tiny_model)
    config.attention_bias = True
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def test_biases_are_whole_values_and_the_latest_wins(tiny_model, input_ids, tmp_path):
    """bias="all" saves every bias, bias="lora_only" those of its targets: a later adapter's values
    replace an earlier one's, whether or not the earlier adapter targeted the layer."""
    base_dir = biased_model(tiny_model, tmp_path / "biased")
    chain = [build_random_lora(base_dir, tmp_path / "all", 1, r=2, lora_alpha=4, target_modules=["q_proj"],
                       bias="all"),
             build_random_lora(base_dir, tmp_path / "lora-only", 2, r=3, lora_alpha=3, target_modules=["k_proj"],
                       bias="lora_only"),
             build_random_lora(base_dir, tmp_path / "none", 3, r=2, lora_alpha=2, target_modules=["v_proj"])]
    for adapter, bias_seed in zip(chain[:2], (11, 12)):  # trained biases, not the base's
        weights = load_file(adapter / "adapter_model.safetensors")
        generator = torch.Generator().manual_seed(bias_seed)
        for key in [k for k in weights if k.endswith(".bias")]:
            weights[key] = torch.randn(weights[key].shape, generator=generator)
        save_file(weights, adapter / "adapter_model.safetensors", metadata={"format": "pt"})

    config, state = fold_adapters(chain)
    assert config["bias"] == "all"  # o_proj has a bias too, and no adapter targets it
    # bake 0 saved k_proj's bias as an untargeted layer's; in the fold k_proj is targeted (by bake 1)
    k_proj = "base_model.model.model.layers.0.self_attn.k_proj"
    assert f"{k_proj}.bias" in load_file(chain[0] / "adapter_model.safetensors")
    assert f"{k_proj}.bias" not in state
    torch.testing.assert_close(state[f"{k_proj}.base_layer.bias"],
                               load_file(chain[1] / "adapter_model.safetensors")[f"{k_proj}.base_layer.bias"])
    folded = fold_lineage(chain, tmp_path / "folded")
    expected = logits(merged_in_turn(base_dir, chain), input_ids)
    assert_same_logits(logits(with_adapter(base_dir, folded), input_ids), expected)
    assert (expected - logits(merged_in_turn(base_dir, chain[1:]), input_ids)).abs().max() > 0.1


def test_download_folded_adapter_and_load_teacher(tiny_model, chain_dirs, input_ids, tmp_path):
    store = LocalStore(tmp_path / "store")
    names = ["alice/pirate/bake0/10", "alice/pirate/bake1/20", "alice/pirate/bake2/30"]
    for parent, name, adapter in zip([None, *names], names, chain_dirs):
        store.publish_model(name, adapter, Lineage(parent=parent, base_model=str(tiny_model)))

    folded = download_folded_adapter(names[-1], store, tmp_path / "folded")
    expected = logits(merged_in_turn(tiny_model, chain_dirs), input_ids)
    assert_same_logits(logits(with_adapter(tiny_model, folded), input_ids), expected)
    record = json.loads((folded / "chain.json").read_text())
    assert record["base_model"] == str(tiny_model)
    assert [lineage["model_name"] for lineage in record["chain"]] == names
    assert not (folded / "lineage.json").exists()  # the folder holds the whole chain, not a delta

    teacher, _ = load_teacher(names[-1], store, device="cpu")
    assert_same_logits(logits(teacher, input_ids), expected)
    first, _ = load_teacher(names[0], store, device="cpu")  # a chain of one
    assert_same_logits(logits(first, input_ids),
                       logits(merged_in_turn(tiny_model, chain_dirs[:1]), input_ids))
    with pytest.raises(ModelNotFoundError, match="alice/pirate/nobake/1"):
        download_folded_adapter("alice/pirate/nobake/1", store, tmp_path / "missing")


@pytest.mark.parametrize("lora, reason", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ["embed_tokens", "q_proj"]}, "embedding LoRA"),
], ids=["dora", "modules_to_save", "embedding"])
def test_an_adapter_that_does_not_fold_is_named(tiny_model, chain_dirs, tmp_path, lora, reason):
    odd = build_random_lora(tiny_model, tmp_path / "odd-bake", 7, **{"r": 2, "target_modules": ["q_proj"], **lora})
    with pytest.raises(UnfoldableAdapter, match=reason) as error:
        fold_lineage([chain_dirs[0], odd], tmp_path / "folded")
    assert "odd-bake" in str(error.value)
    assert not (tmp_path / "folded").exists()
