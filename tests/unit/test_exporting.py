"""tuneline/exporting.py on the tiny Llama: GGUF files that transformers (and llama.cpp, where installed) read back
as the model they came from, with the tokenizer, chat template and lineage inside; refusals in one line."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, OPTConfig

from tuneline.audit import audit
from tuneline.errors import TunelineError
from tuneline.exporting import (
    FAMILIES, check_tokenizer, check_types, end_of_turn_id, export, export_family, load_gguf_model, pre_tokenizer_name,
    to_gguf_layout, write_gguf,
)
from tuneline.fidelity import held_out_sequences
from tuneline.lineage import METADATA_KEY, embedded_lineage
from tuneline.params import validate_section

SYSTEM_PROMPT = "Answer in one word."
LINEAGE = {
    "code": {"commit": "c" * 40, "dirty": False, "dirty_files": []},
    "base": {"source": "file:///models/tiny", "revision": None, "files": {}},
    "dataset": {"inputs": {"data/sources/tiny.jsonl": "e" * 64}, "params": {"system_prompt": SYSTEM_PROMPT}},
}


@pytest.fixture
def merged_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model as the merge stage leaves a model: weights, tokenizer and lineage.json."""
    model_dir = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "lineage.json").write_text(json.dumps(LINEAGE))
    return model_dir


def export_params(**changes) -> object:
    return validate_section("export", {"types": ["f16"], "num_prompts": 4, "max_new_tokens": 6} | changes)


def test_an_f32_file_reads_back_through_transformers_as_the_same_model(merged_dir, tmp_path):
    path = tmp_path / "model-f32.gguf"
    write_gguf(merged_dir, path, "f32", LINEAGE)
    original = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    read_back = load_gguf_model(path, merged_dir)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        torch.testing.assert_close(read_back(input_ids=ids).logits, original(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_llama_q_and_k_are_stored_as_transformers_gguf_loader_undoes_them():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    processor = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 2})
    for name, gguf_name, rows in (("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", 64),
                                  ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight", 32)):
        weight = torch.randn(rows, 64)
        stored = to_gguf_layout(name, weight, config, FAMILIES["llama"])
        assert not torch.equal(stored, weight)
        undone = processor.process(stored.numpy(), gguf_name).weights
        np.testing.assert_array_equal(undone, weight.numpy())


def test_the_file_carries_the_tokenizer_chat_template_end_of_turn_and_lineage(merged_dir, tmp_path):
    path = tmp_path / "model-q8_0.gguf"
    write_gguf(merged_dir, path, "q8_0", LINEAGE)
    fields = GGUFReader(path).fields
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"].contents() == tokenizer.pad_token_id
    assert fields["tokenizer.ggml.eot_token_id"].contents() == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert json.loads(fields[METADATA_KEY].contents()) == LINEAGE
    read_back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "<|im_start|>user\nIs the tumour malignant or benign? 12.04<|im_end|>\n"
    assert read_back(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_a_copied_gguf_file_is_audited_from_its_own_metadata(merged_dir, tmp_path):
    path = tmp_path / "elsewhere" / "model.gguf"
    path.parent.mkdir()
    write_gguf(merged_dir, path, "q8_0", LINEAGE)
    assert embedded_lineage(path) == LINEAGE
    facts = audit(str(path), repo_dir=tmp_path)
    assert facts["found_in"]["where"] == "embedded"
    assert facts["code"]["commit"] == "c" * 40
    assert facts["dataset"]["inputs"] == {"data/sources/tiny.jsonl": "e" * 64}


def test_export_checks_every_file_against_the_merged_model(merged_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    report = export(model_dir=merged_dir, dataset_dir=tiny_dataset_dir, params=export_params(types=["f16", "q4_0"]),
                    out_dir=out)
    assert sorted(path.name for path in out.iterdir()) == ["Modelfile", "model-f16.gguf", "model-q4_0.gguf"]
    f16, q4 = report["files"]["f16"], report["files"]["q4_0"]
    assert report["prompts"] == len(held_out_sequences(tiny_dataset_dir, 4))
    # f16: exactly as close as the merged model rounded to f16 in torch, and the same greedy answers.
    assert f16["within_rounding"] and f16["kl"] == pytest.approx(f16["kl_rounding"], rel=1e-6, abs=1e-12)
    assert f16["greedy_equal"] == 1.0 and f16["top1_agreement"] == 1.0
    assert 0 < f16["kl"] < q4["kl"]
    assert q4["size_bytes"] < f16["size_bytes"]
    if report["llama_cpp"]:  # llama.cpp runs the file itself
        assert f16["llama_cpp"]["top1_agreement"] > 0.95 and f16["llama_cpp"]["tokenization_equal"] == 1.0
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in modelfile
    assert f'SYSTEM """{SYSTEM_PROMPT}"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_a_file_over_max_kl_fails_the_export_in_one_line(merged_dir, tiny_dataset_dir, tmp_path):
    with pytest.raises(TunelineError, match=r"model-q4_0.gguf: KL .* exceeds export.max_kl 1e-09") as error:
        export(model_dir=merged_dir, dataset_dir=tiny_dataset_dir,
               params=export_params(types=["q4_0"], max_kl=1e-9), out_dir=tmp_path)
    assert "\n" not in str(error.value)


def test_a_config_gguf_cannot_carry_fails_the_float_check_naming_the_key(merged_dir, tiny_dataset_dir, tmp_path):
    """llama.cpp runs Mistral as llama, without a sliding window: a window shorter than the prompts shows."""
    config = json.loads((merged_dir / "config.json").read_text())
    config |= {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 4}
    (merged_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(TunelineError, match=r"model-f32.gguf: does not compute what the merged model computes .*"
                                            r"sliding_window 4 \(read back as None\)"):
        export(model_dir=merged_dir, dataset_dir=tiny_dataset_dir, params=export_params(types=["f32"]),
               out_dir=tmp_path)


def test_a_family_without_a_gguf_layout_is_refused_in_one_line():
    with pytest.raises(TunelineError, match=r"model family 'opt': no GGUF export .* set export.types: \[\] to skip"):
        export_family(OPTConfig())


def test_rope_scaling_is_refused_rather_than_exported_wrong():
    config = LlamaConfig(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    with pytest.raises(TunelineError, match="rope_type 'llama3' is not exported to GGUF yet"):
        export_family(config)


def test_unknown_types_and_k_quants_without_llama_cpp_are_named(monkeypatch):
    with pytest.raises(TunelineError, match="export.types: unknown type 'q3'; use f32, f16"):
        check_types(["q8_0", "q3"])
    monkeypatch.setattr("tuneline.exporting.llama_cpp_installed", lambda: False)
    with pytest.raises(TunelineError, match=r"q4_k_m needs llama.cpp: pip install 'tuneline\[llama-cpp\]'"):
        check_types(["q4_k_m"])


def test_k_quants_come_from_llama_cpps_quantizer(merged_dir, tiny_dataset_dir, tmp_path):
    pytest.importorskip("llama_cpp", reason="K-quants need the llama-cpp extra")
    report = export(model_dir=merged_dir, dataset_dir=tiny_dataset_dir, params=export_params(types=["q4_k_m"]),
                    out_dir=tmp_path)
    assert GGUFReader(tmp_path / "model-q4_k_m.gguf").fields["general.file_type"].contents() == 15  # Q4_K_M
    assert report["files"]["q4_k_m"]["llama_cpp"]["top1_agreement"] > 0.5


@pytest.mark.parametrize(("pre_tokenizer", "name"), [
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                             {"type": "ByteLevel", "use_regex": True}]}, "smollm"),
    ({"type": "Whitespace"}, "default"),
])
def test_the_pre_tokenizer_is_named_as_llama_cpp_names_it(pre_tokenizer, name):
    assert pre_tokenizer_name({"pre_tokenizer": pre_tokenizer}) == name


def test_a_sentencepiece_style_tokenizer_is_refused_in_one_line():
    with pytest.raises(TunelineError, match=r"tokenizer.json: a SentencePiece-style BPE \(byte fallback\) tokenizer is "
                                            r"not exported to GGUF yet"):
        check_tokenizer({"model": {"type": "BPE", "byte_fallback": True}})


def test_the_end_of_turn_token_is_the_chat_templates(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == "<|im_end|>"
