"""Every model family users bring, end to end: a tiny random model of each, built from transformers' own classes
and saved as safetensors, goes through fetch (file://) -> convert -> dataset -> train -> merge -> evaluate, the
library calls the stages make, in this process (a stage process per step would cost ten seconds of imports each).

For each family the merge must match the QLoRA model (KL <= 1e-10, top-1 1.0, fp32), and the merged directory
must load in plain transformers with no missing or unexpected keys and give the logits the fidelity check
measured. The families with sliding-window attention get a window shorter than the examples, so packed rows
that ignored it would train on other logits than inference computes.
"""

import json
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PretrainedConfig

from conftest import build_tiny_tokenizer, perturb_lora_b, write_tiny_sources
from tuneline.artifacts import parse_size
from tuneline.converting import convert
from tuneline.data import build_dataset, load_dataset_tokenizer, write_outputs
from tuneline.errors import TunelineError
from tuneline.exporting import export
from tuneline.merging import merge
from tuneline.modeling import QuantSpec, load_quantized_model, pad_batch, read_split
from tuneline.params import MergeParams, TrainParams, validate_section
from tuneline.scoring import evaluate
from tuneline.sources import fetch
from tuneline.training import train, use_packed_attention

WINDOW = 8  # tokens: shorter than every example, so sliding-window attention matters
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, initializer_range=0.1)
# family -> (transformers config class name, what differs from SMALL)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {"head_dim": 128}),  # as every Qwen3: transformers' GGUF reader assumes 128
    "mistral": ("MistralConfig", {"sliding_window": WINDOW}),
    # query_pre_attn_scalar: transformers' GGUF reader assumes 256 (Gemma-2 2B and 9B)
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 256}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": WINDOW, "tie_word_embeddings": True}),
    "phi3": ("Phi3Config", {"num_key_value_heads": 4}),  # fused qkv_proj and gate_up_proj
    "gpt_neox": ("GPTNeoXConfig", {"num_key_value_heads": None}),
    # Conv1D, fan_in_fan_out; 1024 positions, as every GPT-2 (transformers' GGUF reader assumes it)
    "gpt2": ("GPT2Config", {"num_key_value_heads": None, "intermediate_size": None, "max_position_embeddings": 1024}),
    "opt": ("OPTConfig", {"num_key_value_heads": None, "intermediate_size": None, "ffn_dim": 128,
                          "word_embed_proj_dim": 64}),
    "qwen2_moe": ("Qwen2MoeConfig", {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
                                     "num_experts": 4, "num_experts_per_tok": 2}),
}


# Families the export refuses, or whose tiny config GGUF cannot carry (the float check names the key): the rest
# export to GGUF and read back as the merged model.
EXPORT_REFUSED = {
    "gpt_neox": "model family 'gpt_neox': no GGUF export",
    "opt": "model family 'opt': no GGUF export",
    "qwen2_moe": "model family 'qwen2_moe': no GGUF export",
    # Read back by transformers within rounding, but llama.cpp computed other logits (KL 0.08 and 0.13 with the
    # 8-token sliding window): not exported until that is understood.
    "gemma2": "model family 'gemma2': no GGUF export",
    "gemma3": "model family 'gemma3_text': no GGUF export",
    # llama.cpp runs Mistral as llama, without a sliding window: the float check names what the file lacks
    "mistral": r"model-f32.gguf: does not compute what the merged model computes .*: sliding_window 8 \(read back "
               r"as None\)$",
}


def family_config(family: str, tokenizer) -> PretrainedConfig:
    import transformers

    class_name, overrides = FAMILIES[family]
    kwargs = {key: value for key, value in {**SMALL, **overrides}.items() if value is not None}
    return getattr(transformers, class_name)(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, **kwargs,
    )


def build_family_model(family: str, out: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(family_config(family, tokenizer)).eval().save_pretrained(out)


def family_params(tiny_params: dict) -> dict:
    """The tiny params, on the alpaca file alone (free text, examples of 20 to 60 tokens)."""
    dataset = {**tiny_params["dataset"], "sources": [{"path": "tiny.jsonl", "format": "alpaca"}],
               "eval_fraction": 0.1, "template": "tokenizer"}
    evaluate_params = {**tiny_params["evaluate"], "generation": {**tiny_params["evaluate"]["generation"],
                                                                 "max_new_tokens": 4}}
    return {"dataset": validate_section("dataset", dataset),
            "train": TrainParams(**{**tiny_params["train"], "max_steps": 2, "save_steps": 0}),
            "merge": MergeParams(dtype="float32", max_shard_size="2GB", num_prompts=4),
            "evaluate": validate_section("evaluate", evaluate_params)}


def run_pipeline(family: str, root: Path, params: dict) -> dict:
    """fetch -> convert -> dataset -> train -> merge -> evaluate on `family`'s tiny model; the folders, by stage."""
    dirs = {name: root / name for name in ("source", "fetched", "base", "tokenizer", "dataset", "adapter", "merged")}
    for name in ("source", "fetched", "base", "tokenizer", "dataset", "adapter", "merged"):
        dirs[name].mkdir(parents=True)
    build_family_model(family, dirs["source"])
    fetch(source=f"file://{dirs['source']}", expected_sha256={}, out_dir=dirs["fetched"],
          download_dir=root / "download")
    convert(src_dir=dirs["fetched"], out_dir=dirs["base"], tokenizer_dir=dirs["tokenizer"], dtype="float32",
            max_shard_size=parse_size("2GB", "convert.max_shard_size"), write_pth=False)
    data_dir = write_tiny_sources(root / "sources").parent
    tokenizer = load_dataset_tokenizer(dirs["tokenizer"])
    built = build_dataset(params=params["dataset"], data_dir=data_dir, tokenizer=tokenizer,
                          tokenizer_dir=dirs["tokenizer"])
    write_outputs(built, params["dataset"], tokenizer, dirs["tokenizer"], dirs["dataset"])
    train_metrics = train(base_dir=dirs["base"], dataset_dir=dirs["dataset"], params=params["train"],
                          adapter_dir=dirs["adapter"], live=None, run_dir=root / "checkpoints")
    perturb_lora_b(dirs["adapter"])  # two steps barely move B off zero: make the delta count
    merge_metrics = merge(base_dir=dirs["base"], adapter_dir=dirs["adapter"], dataset_dir=dirs["dataset"],
                          params=params["merge"], out_dir=dirs["merged"])
    eval_metrics, _, _ = evaluate(base_dir=dirs["base"], adapter_dir=dirs["adapter"], merged_dir=dirs["merged"],
                                  dataset_dir=dirs["dataset"], merge_metrics=merge_metrics, params=params["evaluate"])
    return {"dirs": dirs, "train": train_metrics, "merge": merge_metrics, "eval": eval_metrics}


@torch.no_grad()
def reloaded_fidelity(dirs: dict[str, Path], num_prompts: int) -> tuple[dict, float, float]:
    """Load the merged directory the plain way: (its loading info, KL and top-1 against the QLoRA model)."""
    merged, info = AutoModelForCausalLM.from_pretrained(dirs["merged"], dtype=torch.float32, output_loading_info=True)
    qlora = PeftModel.from_pretrained(load_quantized_model(dirs["base"], QuantSpec.load(dirs["adapter"])),
                                      dirs["adapter"]).eval()
    sequences = [list(ids) for ids in read_split(dirs["dataset"] / "eval.parquet")["input_ids"][:num_prompts]]
    inputs = pad_batch(sequences, load_dataset_tokenizer(dirs["tokenizer"]).pad_token_id)
    mask = inputs["attention_mask"].bool()
    log_p = torch.log_softmax(qlora(**inputs).logits.double(), -1)
    log_q = torch.log_softmax(merged.eval()(**inputs).logits.double(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)[mask].mean().item()
    top1 = (log_p.argmax(-1) == log_q.argmax(-1))[mask].float().mean().item()
    return info, kl, top1


@torch.no_grad()
def packed_row_error(dirs: dict[str, Path], tokenizer) -> float:
    """Three training examples, all longer than WINDOW, packed into one row as train packs them: the largest
    difference between the row's logits and each example's own (run alone, with the family's usual masks)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.float32).eval()
    assert use_packed_attention(model) is None
    examples = [{"input_ids": list(ids)} for ids in read_split(dirs["dataset"] / "train.parquet")["input_ids"][:3]]
    assert all(len(example["input_ids"]) > WINDOW for example in examples)
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True,
                                              return_position_ids=True)
    packed = {key: value for key, value in collate(examples).items() if key != "labels"}
    alone = torch.cat([model(input_ids=torch.tensor([example["input_ids"]])).logits[0] for example in examples])
    return (model(**packed).logits[0] - alone).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_stage_runs_and_the_merge_is_the_trained_model(family, tmp_path, tiny_params, report):
    started = time.perf_counter()
    params = family_params(tiny_params)
    result = run_pipeline(family, tmp_path, params)
    info, kl, top1 = reloaded_fidelity(result["dirs"], params["merge"].num_prompts)
    merged = result["merge"]
    assert merged["kl"] <= 1e-10 and merged["top1_agreement"] == 1.0, merged
    assert {key: value for key, value in info.items() if value} == {}, info  # no missing or unexpected keys
    merged_config = json.loads((result["dirs"]["merged"] / "config.json").read_text())
    assert merged_config["architectures"] == [type(AutoModelForCausalLM.from_config(
        family_config(family, build_tiny_tokenizer()))).__name__]
    assert kl == pytest.approx(merged["kl"], abs=1e-12) and top1 == 1.0
    assert result["eval"]["merged_matches_qlora"] is True
    # docs/pipeline.md (Model families): every family packs but Gemma2, whose soft-capped attention has no sdpa
    assert result["train"]["batches"] == ("padded" if family == "gemma2" else "packed")
    if result["train"]["batches"] == "packed":
        assert packed_row_error(result["dirs"], load_dataset_tokenizer(result["dirs"]["tokenizer"])) < 1e-4
    exported = export_and_read_back(family, result["dirs"]["merged"], result["dirs"]["dataset"], tmp_path / "export")
    report(f"family {family}: fetch, convert, dataset, train ({result['train']['batches']}), merge, evaluate ran; "
           f"merge KL {merged['kl']:.1e}, top-1 {merged['top1_agreement']:.2f}; into 4-bit KL "
           f"{merged['kl_merge_into_4bit']:.1e}; reload ok; export: {exported} ({time.perf_counter() - started:.0f} s)")


def export_and_read_back(family: str, merged_dir: Path, dataset_dir: Path, out_dir: Path) -> str:
    """Export f32 and q8_0 GGUF files and read them back; or check the family's one-line refusal."""
    out_dir.mkdir()
    params = validate_section("export", {"types": ["f32", "q8_0"], "num_prompts": 4, "max_new_tokens": 4})
    if EXPORT_REFUSED.get(family):
        with pytest.raises(TunelineError, match=EXPORT_REFUSED[family]) as error:
            export(model_dir=merged_dir, dataset_dir=dataset_dir, params=params, out_dir=out_dir)
        assert "\n" not in str(error.value)
        return f"refused ({str(error.value)[:90]}...)"
    files = export(model_dir=merged_dir, dataset_dir=dataset_dir, params=params, out_dir=out_dir)["files"]
    assert files["f32"]["within_rounding"] and files["f32"]["greedy_equal"] == 1.0, files
    assert files["f32"]["kl"] < 1e-9 and files["f32"]["top1_agreement"] == 1.0, files
    assert files["q8_0"]["kl"] < 0.05, files
    llama_cpp = files["f32"].get("llama_cpp")
    if llama_cpp:  # the llama-cpp extra is installed: llama.cpp runs the file too
        assert llama_cpp["top1_agreement"] >= 0.99 and llama_cpp["greedy_equal"] == 1.0, llama_cpp
    by_llama_cpp = (f", llama.cpp f32 KL {llama_cpp['kl']:.1e} top-1 {llama_cpp['top1_agreement']:.2f}"
                    if llama_cpp else "")
    return f"f32 KL {files['f32']['kl']:.1e}, q8_0 KL {files['q8_0']['kl']:.1e}{by_llama_cpp}"


def test_every_causal_lm_family_transformers_ships_is_buildable_or_refused_in_one_line(report):
    """Beyond the families above: each causal-LM family transformers ships, with its default config, either
    passes the checks convert, train and `tuneline check` run (built on the meta device, a layer to quantize)
    or is refused in one line naming the family; never another error."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from tuneline.modeling import check_family, meta_model

    supported, refused, no_default = [], {}, []
    for family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        try:
            config = CONFIG_MAPPING[family]()
        except Exception:  # transformers' own default config does not validate: no model to try
            no_default.append(family)
            continue
        try:
            check_family(meta_model(config))
            supported.append(family)
        except TunelineError as error:
            refused[family] = str(error)
    for family, message in refused.items():
        assert message.startswith(f"model family '{family}'") and "\n" not in message, message
    assert set(FAMILIES) <= set(supported)
    assert "no layer that 4-bit loading quantizes" in refused["falcon"]  # FalconLinear subclasses Linear
    report(f"families transformers ships: {len(supported)} pass the checks with their default config, "
           f"{len(refused)} refused in one line ({', '.join(sorted(refused))}), {len(no_default)} without a default "
           f"config that validates ({', '.join(no_default)})")
