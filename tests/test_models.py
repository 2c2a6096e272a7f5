"""Real-model loading on the zoo's code path, offline: tiny models saved in the Hugging Face format
(GPT-2 and Llama architectures, random weights, their own tokenizers), a LoRA adapter saved by peft,
an SAE saved by sae-lens, and the real-model grid's configuration."""

import json
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
import yaml

from madlib.data import datasets as qdata
from madlib.models import hub as models
from madlib.features.activations import extract
from madlib.models.hooks import hook_name
from madlib.models.info import info_of
from madlib.models.tokenizer import answer_token_ids
from madlib.paths import results_dir

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Name: Bob\n\n\n\n***STATEMENT:*** 1 + 2 = 3.\n\nIs the statement factually correct?",
    "Name: Alice\n\nParis is in France.\n\n***STATEMENT:*** Paris is in the northern hemisphere.\n\nIs the statement factually correct?",
    "Name: Kara\n\n\n\n***STATEMENT:*** 12*3=36.\n\nIs the statement factually correct?",
]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def _tokenizer(kind: str):
    """A small BPE tokenizer: GPT-2 style (byte level, ``<|endoftext|>``) or Llama style
    (sentencepiece-like ``▁`` spaces, ``<s>`` prepended by the tokenizer itself)."""
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [*PROMPTS * 3, *qdata.quirky_dataset("addition", n=40, seed=1)["prompt"], *["correct? Yes correct? No"] * 50]
    tok = Tokenizer(tmodels.BPE(unk_token="<unk>"))
    if kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        special = ["<|endoftext|>", "<unk>"]
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        special = ["<unk>", "<s>", "</s>"]
        alphabet = sorted(set("".join(corpus)) | {"▁"})
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=special, initial_alphabet=alphabet, show_progress=False))
    if kind == "gpt2":
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side="left")


def _save_model(kind: str, path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(kind)
    torch.manual_seed(0)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=128, n_ctx=128, **ids))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096, tie_word_embeddings=False, **ids,
        ))  # fmt: skip
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: _save_model(kind, root / f"tiny-{kind}") for kind in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def adapter_dir(hf_dirs, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(hf_dirs["llama"], dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False))
    path = tmp_path_factory.mktemp("adapter") / "tiny-llama-lora"
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(hf_dirs):
    return {kind: models.load_model(str(d), device="cpu") for kind, d in hf_dirs.items()}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_extraction_from_a_local_hf_model_matches_single_prompts(loaded, kind):
    model = loaded[kind]
    assert model.cfg.original_architecture == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[kind]
    assert model.cfg.dtype == torch.float32 and model.cfg.model_name == f"tiny-{kind}"
    if kind == "llama":
        assert model.cfg.n_ctx == models.MAX_CTX and model.cfg.n_key_value_heads == 2
    # the Llama-style tokenizer pads on the left; extraction must not care
    assert model.tokenizer.padding_side == "right"
    model.tokenizer.padding_side = "left" if kind == "llama" else "right"
    layers = [0, 1, 2]
    batched = extract(model, PROMPTS, layers, batch_size=3, progress=False)
    assert model.tokenizer.padding_side == ("left" if kind == "llama" else "right")
    model.tokenizer.padding_side = "right"
    no, yes = answer_token_ids(model.tokenizer)
    for i, p in enumerate(PROMPTS):
        toks = model.to_tokens(p)
        assert toks[0, 0].item() == model.tokenizer.bos_token_id and (toks[0] == model.tokenizer.bos_token_id).sum() == 1
        logits, cache = model.run_with_cache(toks)
        for layer in layers:
            assert torch.allclose(batched.acts[layer][i], cache[hook_name(layer, 2)][0, -1], atol=1e-5)
        assert batched.log_odds[i].item() == pytest.approx((logits[0, -1, yes] - logits[0, -1, no]).item(), abs=1e-4)


def test_answer_tokens_are_read_in_context(loaded):
    gpt2, llama = loaded["gpt2"].tokenizer, loaded["llama"].tokenizer
    assert gpt2.convert_ids_to_tokens(list(answer_token_ids(gpt2))) == ["ĠNo", "ĠYes"]
    # sentencepiece-style: the answer token carries the word-boundary marker
    assert llama.convert_ids_to_tokens(list(answer_token_ids(llama))) == ["▁No", "▁Yes"]


def test_streamed_extraction_matches_memory_and_is_reused(loaded, tmp_path, monkeypatch):
    model = loaded["llama"]
    mem = extract(model, PROMPTS, [1, 2], batch_size=2, progress=False)
    disk = extract(model, PROMPTS, [1, 2], batch_size=2, progress=False, out_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer_1.npy", "layer_2.npy", "log_odds.npy", "meta.json"]
    assert isinstance(np.load(tmp_path / "layer_1.npy", mmap_mode="r"), np.memmap)
    for layer in (1, 2):
        assert torch.equal(disk.acts[layer], mem.acts[layer])
    assert torch.equal(disk.log_odds, mem.log_odds)
    monkeypatch.setattr(model, "run_with_hooks", lambda *a, **k: pytest.fail("complete files must be reused"))
    again = extract(model, PROMPTS, [1, 2], progress=False, out_dir=tmp_path)
    assert torch.equal(again.acts[2], mem.acts[2])
    half = extract(loaded["gpt2"], PROMPTS, [1], batch_size="auto", progress=False, out_dir=tmp_path / "h", out_dtype="float16")
    assert half.acts[1].dtype == torch.float16 and half.acts[1].shape == (3, 32)


def test_lora_adapter_is_merged_like_peft(hf_dirs, adapter_dir, loaded):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = models.load_model(str(hf_dirs["llama"]), adapter=str(adapter_dir), device="cpu")
    assert info_of(merged).hub["adapter"] == str(adapter_dir) and merged.cfg.model_name == "tiny-llama+tiny-llama-lora"
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dirs["llama"], dtype=torch.float32), adapter_dir)
    reference = reference.merge_and_unload().eval()
    toks = merged.to_tokens(PROMPTS[1])
    with torch.no_grad():
        ours = merged(toks).log_softmax(-1)
        base = loaded["llama"](toks).log_softmax(-1)
        theirs = reference(toks).logits.log_softmax(-1)
    assert (ours - base).abs().max() > 1e-3
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_unreachable_hub_id_fails_at_once_in_one_line(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    for offline in (False, True):  # probing the hub (no network here) and HF_HUB_OFFLINE alike
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        t0 = time.time()
        with pytest.raises(models.HubUnavailableError) as err:
            models.load_model("madlib-tests/no-such-model", device="cpu")
        assert time.time() - t0 < 20
        msg = str(err.value)
        assert "\n" not in msg and "'madlib-tests/no-such-model'" in msg
        assert "hf download madlib-tests/no-such-model --local-dir <dir>" in msg
    with pytest.raises(ValueError, match="model='/no/such/dir' is not accepted"):
        models.load_model("/no/such/dir")


def test_check_available_fails_on_the_first_unloadable_model_before_any_work(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    models.check_available(["zoo-gpt2", "zoo-llama-early", str(tmp_path)])  # zoo names and directories pass
    t0 = time.time()
    with pytest.raises(models.HubUnavailableError) as err:
        models.check_available(["zoo-gpt2", "madlib-tests/no-such-model"])
    assert time.time() - t0 < 5
    assert "\n" not in str(err.value) and str(err.value).startswith("model='madlib-tests/no-such-model' could not be fetched")
    with pytest.raises(ValueError, match=r"model='zoo-gtp2' is not accepted; .*did you mean 'zoo-gpt2'"):
        models.check_available(["zoo-gtp2"])
    with pytest.raises(ValueError, match=r"model='no such/dir/x' is not accepted"):
        models.check_available(["no such/dir/x"])
    # a hub id in the cache passes offline
    snap = tmp_path / "models--org--cached" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "models--org--cached" / "refs").mkdir()
    (tmp_path / "models--org--cached" / "refs" / "main").write_text("abc")
    models.check_available(["org/cached"])


def test_zoo_names_delegate_to_the_zoo(monkeypatch):
    from madlib.models import zoo

    monkeypatch.setattr(zoo, "get_model", lambda name, preset, dataset=None, seed=0: ("zoo", name, preset, dataset, seed))
    assert models.load_model("zoo-llama", preset="tiny") == ("zoo", "zoo-llama", "tiny", None, 0)
    with pytest.raises(ValueError, match="adapter="):
        models.load_model("zoo-gpt2", adapter="x", preset="tiny")
    with pytest.raises(ValueError, match=r"model='zoo-gtp2' is not accepted; zoo models are .* \(did you mean 'zoo-gpt2'\?\)"):
        models.load_model("zoo-gtp2")
    assert models.adapter_for("EleutherAI/{model}-{dataset}-random", "mistralai/Mistral-7B-v0.1", "nli") == (
        "EleutherAI/Mistral-7B-v0.1-nli-random"
    )
    assert models.adapter_for("EleutherAI/{model}-{dataset}", "zoo-gpt2", "nli") is None
    calls = []
    monkeypatch.setattr(models, "load_model", lambda spec, adapter, preset: calls.append((spec, adapter)) or (spec, adapter))
    loader = models.ModelLoader("org/{model}-{dataset}", preset="tiny", seed=2)
    grid = [loader(m, d) for m in ("zoo-gpt2", "zoo-gpt2@1", "hub/m") for d in ("nli", "sciq")]
    # a zoo name loads its fine-tune per dataset (the loader's seed, or the name's @seed); a hub name its adapter
    assert grid == [("zoo", "zoo-gpt2", "tiny", "nli", 2), ("zoo", "zoo-gpt2", "tiny", "sciq", 2),
                    ("zoo", "zoo-gpt2", "tiny", "nli", 1), ("zoo", "zoo-gpt2", "tiny", "sciq", 1),
                    ("hub/m", "org/m-nli"), ("hub/m", "org/m-sciq")]  # fmt: skip
    assert calls == [("hub/m", "org/m-nli"), ("hub/m", "org/m-sciq")]
    assert loader("hub/m", "sciq") is grid[-1] and calls[-1] == ("hub/m", "org/m-sciq") and len(calls) == 2, "held, not reloaded"


def test_gemma_is_converted_by_its_official_name():
    from transformers import GemmaConfig, LlamaConfig

    gemma_2b = GemmaConfig(
        hidden_size=2048, num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
        intermediate_size=16384, vocab_size=256000, architectures=["GemmaForCausalLM"],
    )  # fmt: skip
    assert models.infer_tl_name(gemma_2b, "google/gemma-2b-it") == "google/gemma-2b-it"
    assert models.infer_tl_name(gemma_2b, "/local/copy").startswith("google/gemma-2b")
    assert models.infer_tl_name(LlamaConfig(architectures=["LlamaForCausalLM"]), "/local/copy") is None
    gemma_2b.vocab_size = 77
    with pytest.raises(ValueError, match="pass tl_name="):
        models.infer_tl_name(gemma_2b, "/local/copy")


def test_device_precision_and_batch_size(loaded):
    assert models.default_device() == ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    assert models.default_dtype("cpu") == "float32" and models.default_dtype("cuda") == "bfloat16"
    with pytest.raises(ValueError, match="dtype='fp8' is not accepted"):
        models.load_model("/tmp", dtype="fp8", device="cpu")
    cfg = loaded["gpt2"].cfg
    per = models.bytes_per_prompt(cfg, 50)
    # fp32, d_vocab 400+, d_model 32, d_mlp 128, 4 heads: the logits dominate
    assert per == 2 * 50 * (4 * (cfg.d_vocab + 6 * 32 + 3 * 128) + 4 * 2 * 4 * 50)
    assert models.auto_batch_size(loaded["gpt2"], 50, free_bytes=int(per * 10 / 0.6) + 10) == 10
    assert models.auto_batch_size(loaded["gpt2"], 50, free_bytes=0) == 1
    assert models.auto_batch_size(loaded["gpt2"], 50, free_bytes=10**15) == 512
    assert models.auto_batch_size(loaded["gpt2"], 50) >= 1


def test_sae_from_disk_encodes_at_its_hook(loaded, tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    model = loaded["gpt2"]
    torch.manual_seed(2)
    metadata = SAEMetadata(hook_name="blocks.1.hook_resid_pre", model_name="tiny-gpt2")
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, metadata=metadata))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    sae.save_model(tmp_path / "sae")
    loaded_sae = models.load_sae(str(tmp_path / "sae"), device="cpu")
    assert models.sae_hook_name(loaded_sae) == "blocks.1.hook_resid_pre"
    toks = model.to_tokens(PROMPTS[:2])
    latents = models.sae_latents(model, loaded_sae, toks)
    _, cache = model.run_with_cache(toks)
    x = cache["blocks.1.hook_resid_pre"]
    want = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert latents.shape == (*toks.shape, 64) and torch.allclose(latents, want, atol=1e-4)
    with pytest.raises(ValueError, match="has no cfg.json"):
        models.load_sae(str(tmp_path), device="cpu")


def test_pretrained_sae_release_offline_and_bad_names(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(models.HubUnavailableError) as err:
        models.load_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre", device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and "jbloom/GPT2-Small-SAEs-Reformatted" in msg and "<dir>/blocks.8.hook_resid_pre" in msg
    with pytest.raises(ValueError, match="sae_id='blocks.99' is not accepted"):
        models.load_sae("gpt2-small-res-jb", "blocks.99", device="cpu")
    with pytest.raises(ValueError, match="sae='no-such-release' is not accepted"):
        models.load_sae("no-such-release", device="cpu")


def _parameters(notebook: Path) -> set[str]:
    nb = nbformat.read(notebook, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return {line.split(":")[0].strip() for line in cell.source.splitlines() if ":" in line and not line.startswith("#")}


def test_real_model_grid_config_and_commands():
    cfg = yaml.safe_load((ROOT / "configs" / "real_models.yaml").read_text())
    seed000 = cfg["seeds"]["000"]
    assert len(seed000["models"]) == 2 and len(seed000["datasets"]) == 12
    from madlib.data.hub import HUB_DATASETS

    assert sorted(seed000["datasets"]) == sorted(HUB_DATASETS)
    adapters = [models.adapter_for(seed000["adapter"], m, d) for m in seed000["models"] for d in seed000["datasets"]]
    assert "EleutherAI/Meta-Llama-3.1-8B-sciq-random-standardized-many-random-names" in adapters and len(set(adapters)) == 24
    checked, missing = 0, {}
    for seed in cfg["seeds"].values():
        for run in seed["runs"]:
            notebook = ROOT / "notebooks" / f"{run['notebook']}.ipynb"
            assert set(run) == {"notebook", "parameters"}
            json.dumps(run["parameters"])  # papermill -y takes them as YAML
            if notebook.is_file():  # notebooks still being written are checked once they exist
                checked += 1
                lacking = set(run["parameters"]) - _parameters(notebook)
                if lacking:
                    missing[run["notebook"]] = sorted(lacking)
    assert checked == sum(len(seed["runs"]) for seed in cfg["seeds"].values())
    assert not missing, f"notebook parameters the real-model commands need, not in the notebooks: {missing}"


def test_drift_notebook_on_external_finetunes_and_a_pretrained_sae(hf_dirs, adapter_dir, tmp_path):
    """The drift notebook on a model outside the zoo: fine-tunes given by parameter (a LoRA merge,
    and the base itself as a control that cannot drift), evaluation prompts from files, an SAE
    saved by sae-lens."""
    import pandas as pd
    import papermill as pm
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(3)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_pre")))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    sae.save_model(tmp_path / "sae")
    (tmp_path / "add.txt").write_text("\n".join(PROMPTS[:1] + PROMPTS[2:]) + "\n")
    (tmp_path / "hemi.jsonl").write_text(json.dumps({"text": PROMPTS[1]}) + "\n" + json.dumps({"text": "Rome is in Italy."}) + "\n")
    base = str(hf_dirs["llama"])
    pm.execute_notebook(
        str(ROOT / "notebooks" / "drift.ipynb"), str(tmp_path / "drift.ipynb"), cwd=str(ROOT), progress_bar=False,
        kernel_name="python3",
        parameters=dict(model=base, finetuned={"addition": [base, str(adapter_dir)], "hemisphere": base},
                        task_prompts={"addition": str(tmp_path / "add.txt"), "hemisphere": str(tmp_path / "hemi.jsonl"),
                                      "general": PROMPTS + ["The sky is blue."]},
                        sae=str(tmp_path / "sae"), n_eval=7, k=2, k_max=3, batch_size=2, max_tokens=24),
    )  # fmt: skip
    table = pd.read_csv(results_dir("drift") / "drift.csv")
    assert len(table) == 2 * 3 * 3 and set(table["hook"]) == {"blocks.1.hook_resid_pre"}
    same = table[table["task"] == "hemisphere"]
    assert np.allclose(same["intersection_mean"], same["k"]) and np.allclose(same["act_distance"], 0, atol=1e-6)
    lora = table[table["task"] == "addition"]
    assert (lora["act_distance"] > 1e-3).all() and (lora["intersection_mean"] <= lora["k"]).all()
    assert set(table["eval_set"]) == {"addition", "hemisphere", "general"}


def test_drift_rejects_bad_external_parameters(tmp_path):
    from madlib.analyses import drift

    with pytest.raises(ValueError, match=r"task_prompts=\['general'\] is not accepted; it needs prompts for \['math'\]"):
        drift.text_sets({"general": ["a"]}, ["math"], 5, 0)
    with pytest.raises(ValueError, match="task_prompts\\['math'\\]='nope.txt' is not accepted"):
        drift.text_sets({"general": ["a"], "math": "nope.txt"}, ["math"], 5, 0)
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "a"}) + "\n")
    with pytest.raises(ValueError, match="'text' or 'prompt' field"):
        drift.read_prompts(str(tmp_path / "x.jsonl"))
    with pytest.raises(ValueError, match=r"finetuned\['math'\]=\['a'\] is not accepted"):
        drift.finetune_loaders({"math": ["a"]})
    sets = drift.text_sets({"general": [str(i) for i in range(10)], "math": ["1", "2"]}, ["math"], 4, 0)
    assert len(sets["general"]) == 4 and sets["math"] == ["1", "2"]


def _readme_commands() -> list[tuple[str, dict]]:
    """(notebook, parameters) of each papermill command in the README's real-model section."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Reproduce the source studies on real models") :]
    section = section[: section.find("\n## ", 10) if "\n## " in section[10:] else None]
    out = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for cmd in re.findall(r"^\.venv/bin/papermill .*?(?=^\.venv/bin/papermill |\Z)", block, flags=re.S | re.M):
            args = shlex.split(cmd)
            params, i = {}, 3
            while i < len(args):
                if args[i] == "-p":
                    params[args[i + 1]] = yaml.safe_load(args[i + 2])
                    i += 3
                elif args[i] == "-y":
                    params.update(yaml.safe_load(args[i + 1]))
                    i += 2
                else:
                    raise AssertionError(f"unexpected argument {args[i]!r} in README command {cmd!r}")
            out.append((Path(args[1]).stem, params))
    return out


def test_readme_real_model_commands_match_the_config_and_stop_offline_in_one_line(tmp_path, monkeypatch):
    import papermill as pm

    cfg = yaml.safe_load((ROOT / "configs" / "real_models.yaml").read_text())
    runs = [run for seed in cfg["seeds"].values() for run in seed["runs"]]
    commands = _readme_commands()
    assert sorted(n for n, _ in commands) == sorted(r["notebook"] for r in runs)
    for notebook, params in commands:
        assert set(params) <= _parameters(ROOT / "notebooks" / f"{notebook}.ipynb"), notebook
        assert any(r["notebook"] == notebook and all(r["parameters"].get(k) == v for k, v in params.items()) for r in runs), (
            f"the README's {notebook} command differs from configs/real_models.yaml"
        )
    # offline, a command runs until the hub and stops there with one line naming what to download
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    notebook, params = next(c for c in commands if c[0] == "perturb")
    t0 = time.perf_counter()
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(ROOT / "notebooks" / "perturb.ipynb"), str(tmp_path / "out.ipynb"), parameters=params,
                            cwd=str(ROOT), progress_bar=False, kernel_name="python3")  # fmt: skip
    assert err.value.ename == "HubUnavailableError" and "gpt2" in err.value.evalue and "\n" not in err.value.evalue
    assert time.perf_counter() - t0 < 120


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_residual_identities_hold_on_load_and_a_broken_hook_is_named(loaded, kind):
    model = loaded[kind]
    models.check_residual_identities(model)  # load_model ran it too
    hook = model.blocks[1].hook_resid_post
    handle = hook.register_forward_hook(lambda module, inputs, out: out * 1.5)  # the stream is no longer the sum of its parts
    try:
        with pytest.raises(ValueError, match=rf"^model='tiny-{kind}' fails the residual identity at blocks\.1\.hook_resid_post "):
            models.check_residual_identities(model)
    finally:
        handle.remove()
    models.check_residual_identities(model)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_attribution_and_fine_tuning_read_a_hub_model_through_its_own_tokenizer(loaded, kind):
    """AtP log-odds, the answer KL and the trusted fine-tune of a hub-format model use its own
    tokenizer and answer tokens (its 400-token vocabulary is not madlib's)."""
    from madlib.features.attribution import Attribution, AttributionConfig, answer_kl
    from madlib.models.tokenizer import model_answer_ids
    from madlib.models.finetune import FinetuneConfig, finetune

    model = loaded[kind]
    no, yes = answer_token_ids(model.tokenizer)
    assert model_answer_ids(model) == (no, yes) and model.cfg.d_vocab < 642
    labels = np.array([i % 2 for i in range(len(PROMPTS))])
    atp = Attribution(model, AttributionConfig(batch_size=2)).fit(PROMPTS, labels, progress=False)
    feats = atp.features(PROMPTS, progress=False)
    for i, p in enumerate(PROMPTS):
        logits = model(model.to_tokens(p))[0, -1]
        assert feats.log_odds[i].item() == pytest.approx((logits[yes] - logits[no]).item(), abs=1e-4)
    assert set(feats.effects) == set(range(model.cfg.n_layers)) and all(torch.isfinite(v).all() for v in feats.effects.values())
    ft, hist = finetune(model, PROMPTS, labels, FinetuneConfig(steps=3, batch_size=2, lr=1e-2), progress=False)
    assert np.isfinite(hist["answer_loss"]).all()
    kl = answer_kl(model, ft, PROMPTS, batch_size=2)
    p_logits, q_logits = model(model.to_tokens(PROMPTS[0]))[0, -1], ft(ft.to_tokens(PROMPTS[0]))[0, -1]
    p, q = (torch.softmax(x[[no, yes]].double(), -1) for x in (p_logits, q_logits))
    assert kl[0] == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-3, abs=1e-7) and (kl > 0).all()
