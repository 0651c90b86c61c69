"""tuneline/params.py and `tuneline check`: every section validated, each mistake named in one line."""

import copy
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT, write_tiny_sources
from tuneline.errors import TunelineError
from tuneline.params import (
    MCQ_INSTRUCTIONS, TrainParams, load_section, read_params_file, validate_section,
)


@pytest.fixture(scope="module")
def real_params() -> dict:
    return yaml.safe_load((PROJECT / "params.yaml").read_text())


# ------------------------------------------------------------------------------------------------- params


class TestParams:
    def test_real_and_tiny_params_files_validate(self, tmp_path, tiny_params, tiny_model_dir, capsys):
        from tuneline.cli import check

        check(PROJECT / "params.yaml", tmp_path / "not-converted")
        tiny_file = tmp_path / "params.yaml"
        tiny_file.write_text(yaml.safe_dump(tiny_params, sort_keys=False))
        write_tiny_sources(tmp_path / "data" / "sources")
        check(tiny_file, tiny_model_dir)
        out = capsys.readouterr().out
        assert out.count(": ok (fetch, convert, dataset, train, merge, export, evaluate, promote)") == 2
        assert "not-converted: not converted yet; the train stage checks target modules and memory itself" in out
        assert f"{tiny_model_dir}: target modules present; training needs about 0.5 GiB at batch 4 x 256 tokens" in out

    @staticmethod
    def check_with(tmp_path: Path, params: dict, model_dir: Path) -> str:
        """The one-line error `tuneline check` gives for `params` against the model in `model_dir`."""
        from tuneline.cli import check

        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        write_tiny_sources(tmp_path / "data" / "sources")
        with pytest.raises(TunelineError) as error:
            check(path, model_dir)
        return str(error.value)

    def test_check_names_a_target_module_missing_from_the_model(self, tmp_path, params, tiny_model_dir):
        params["train"]["target_modules"] = ["q_proj", "query_key_value"]  # a Falcon name on a Llama
        message = self.check_with(tmp_path, params, tiny_model_dir)
        assert message.startswith("params.yaml: train.target_modules: 'query_key_value' matches no linear layer")
        assert "q_proj" in message  # names the layers there are

    def test_check_refuses_a_batch_too_big_for_the_memory_at_hand(self, tmp_path, params, tiny_model_dir):
        params["train"]["batch_size"] = 10**6
        message = self.check_with(tmp_path, params, tiny_model_dir)
        assert message.startswith("params.yaml: train.batch_size: 1000000 sequences of 256 tokens "
                                  "(dataset.max_length) need about ")
        assert "lower train.batch_size" in message and "gradient_checkpointing" in message

    def test_check_refuses_an_export_the_family_has_no_gguf_layout_for(self, tmp_path, params, capsys):
        from transformers import OPTConfig

        model_dir = tmp_path / "opt"
        OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                  word_embed_proj_dim=64).save_pretrained(model_dir)
        message = self.check_with(tmp_path, params, model_dir)
        assert message.startswith("model family 'opt': no GGUF export"), message
        from tuneline.cli import check

        params["export"]["types"] = []  # no export: nothing to refuse
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        check(tmp_path / "params.yaml", model_dir)
        assert "opt: target modules present" in capsys.readouterr().out

    def test_check_names_a_k_quant_that_needs_llama_cpp(self, tmp_path, params, tiny_model_dir, monkeypatch):
        monkeypatch.setattr("tuneline.exporting.llama_cpp_installed", lambda: False)
        params["export"]["types"] = ["q4_k_m"]
        message = self.check_with(tmp_path, params, tiny_model_dir)
        assert message.startswith("params.yaml: export.types: q4_k_m needs llama.cpp"), message

    def test_check_names_a_local_fetch_source_that_does_not_exist(self, tmp_path, params, tiny_model_dir):
        params["fetch"]["source"] = f"file://{tmp_path}/no-such-model"
        message = self.check_with(tmp_path, params, tiny_model_dir)
        assert message == f"params.yaml: fetch.source: file://{tmp_path}/no-such-model does not exist"

    def test_check_names_a_dataset_source_that_matches_no_file(self, tmp_path, tiny_params):
        from tuneline.cli import check

        tiny_file = tmp_path / "params.yaml"
        tiny_file.write_text(yaml.safe_dump(tiny_params, sort_keys=False))
        with pytest.raises(TunelineError) as error:
            check(tiny_file, tmp_path / "models" / "base")  # data/sources/tiny.jsonl was never written
        assert str(error.value) == (
            f"params.yaml: dataset.sources[1].path: 'tiny.jsonl' matches no file under {tmp_path}/data/sources/"
        )

    @pytest.mark.parametrize(
        ("where", "value", "expected"),
        [
            (("fetch", "hf_token"), "anything", "fetch.hf_token: params.yaml must hold no credentials"),
            # credential-shaped values are assembled here, so that no tracked file holds one
            (("fetch", "source"), "hf://org/model@main?token=" + "hf" + "_" + "a1" * 17,
             "fetch.source: looks like a Hugging Face token"),
            (("fetch", "source"), "https://user" + ":" + "hunter2" + "@example.com/model.gguf",
             "fetch.source: looks like a password in a URL"),
            (("dataset", "system_prompt"), "key " + "sk" + "-" + "b2" * 13,
             "dataset.system_prompt: looks like an API key"),
        ],
    )
    def test_a_secret_in_params_is_refused_without_echoing_it(self, tmp_path, tiny_params, where, value, expected):
        from tuneline.params import read_params_file

        params = copy.deepcopy(tiny_params)
        params[where[0]][where[1]] = value
        params_file = tmp_path / "params.yaml"
        params_file.write_text(yaml.safe_dump(params))
        with pytest.raises(TunelineError) as error:
            read_params_file(params_file)
        message = str(error.value)
        assert expected in message and "export HF_TOKEN" in message
        assert value not in message and "hunter2" not in message
        assert "\n" not in message

    def test_unknown_key_is_named(self, tiny_params):
        train = {**tiny_params["train"], "lora_rank": 8}
        with pytest.raises(TunelineError) as error:
            validate_section("train", train)
        message = str(error.value)
        assert "train.lora_rank" in message and "unknown key" in message
        assert "lora_r" in message  # lists the known keys
        assert "\n" not in message

    def test_wrong_type_is_named(self, tiny_params):
        train = {**tiny_params["train"], "lora_r": "sixteen"}
        with pytest.raises(TunelineError) as error:
            validate_section("train", train)
        assert "params.yaml: train.lora_r:" in str(error.value)
        assert "sixteen" in str(error.value)

    def test_out_of_range_value_is_named(self, tiny_params):
        dataset = {**tiny_params["dataset"], "eval_fraction": 1.5}
        with pytest.raises(TunelineError, match=r"dataset\.eval_fraction"):
            validate_section("dataset", dataset)

    def test_missing_key_is_named(self, tiny_params):
        merge = {key: value for key, value in tiny_params["merge"].items() if key != "num_prompts"}
        with pytest.raises(TunelineError, match=r"merge\.num_prompts: missing"):
            validate_section("merge", merge)

    def test_missing_section(self, tmp_path, tiny_params):
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump({k: v for k, v in tiny_params.items() if k != "merge"}))
        with pytest.raises(TunelineError, match=r"missing section 'merge'"):
            load_section("merge", path)
        assert isinstance(load_section("train", path), TrainParams)

    def test_invalid_yaml_and_missing_file(self, tmp_path):
        bad = tmp_path / "params.yaml"
        bad.write_text("train: [unclosed\n")
        with pytest.raises(TunelineError, match="not valid YAML"):
            read_params_file(bad)
        with pytest.raises(TunelineError, match="not found"):
            read_params_file(tmp_path / "absent.yaml")

    def test_unknown_section_refused_by_check(self, tmp_path, tiny_params):
        from tuneline.cli import check

        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump({**tiny_params, "trian": {}}))
        with pytest.raises(TunelineError, match="unknown section.*trian"):
            check(path, tmp_path / "models" / "base")

    def test_union_field_error_names_the_plain_key(self, tiny_params):
        train = {**tiny_params["train"], "target_modules": "q_proj"}  # a string, not a list
        with pytest.raises(TunelineError) as error:
            validate_section("train", train)
        assert "params.yaml: train.target_modules: " in str(error.value)

    def test_mcq_sources_generate_questions_unless_told_to_answer_them(self, tiny_params):
        sources = [{"path": "q.csv", "format": "mcq"}, {"path": "q.csv", "format": "mcq", "task": "answer"},
                   {"path": "q.csv", "format": "mcq", "task": "answer", "instruction": "Pick one."}]
        dataset = validate_section("dataset", {**tiny_params["dataset"], "sources": sources})
        assert [(source.task, source.instruction) for source in dataset.sources] == [
            ("generate", "Write a multiple-choice question with four options (A-D) and the answer key."),
            ("answer", MCQ_INSTRUCTIONS["answer"]),
            ("answer", "Pick one."),
        ]

    def test_an_unknown_mcq_task_is_named(self, tiny_params):
        sources = [{"path": "q.csv", "format": "mcq", "task": "solve"}]
        with pytest.raises(TunelineError) as error:
            validate_section("dataset", {**tiny_params["dataset"], "sources": sources})
        assert str(error.value) == (
            "params.yaml: dataset.sources[0].task: input should be 'generate' or 'answer' (got 'solve')"
        )

    def test_lm_eval_reads_only_the_built_in_tasks_by_default(self, real_params):
        assert validate_section("evaluate", real_params["evaluate"]).lm_eval.include_path is None
