"""Data cached by content, through the real DVC CLI on the tiny model: what reruns when a data file, the
template, the tokenizer or the dataset card changes, and what does not.

The tests share this module's copy of the reproduced tiny pipeline (see conftest's `clean_pipeline_repo`).
"""

import json
import os
import shutil

from conftest import CHATML_TEMPLATE, TINY_SOURCE, dvc_status, read_params, repro, sha256, write_params


def test_touching_a_data_file_reruns_nothing_and_editing_it_reruns_dataset_and_stales_its_consumers(
        clean_pipeline_repo):
    data_file = clean_pipeline_repo / "data/sources" / TINY_SOURCE
    content = data_file.read_bytes()
    data_file.write_bytes(content)  # rewritten unchanged: new mtime, same content
    os.utime(data_file, (1, 1))
    assert dvc_status(clean_pipeline_repo) == {}
    ran = repro(clean_pipeline_repo)
    assert ran == set(), ran.log

    # every answer edited, so that the few training steps surely see a changed row
    rows = [json.loads(line) for line in content.decode().splitlines()]
    data_file.write_text("".join(json.dumps({**row, "output": row["output"] + " indeed"}) + "\n" for row in rows))
    assert set(dvc_status(clean_pipeline_repo)) == {"dataset"}
    ran = repro(clean_pipeline_repo, "dataset")  # test_repro.py runs a whole dataset-onwards repro
    assert ran == {"dataset"}, ran.log
    assert set(dvc_status(clean_pipeline_repo)) == {"train", "merge", "export", "evaluate", "lineage"}
    card = json.loads((clean_pipeline_repo / "data/dataset/dataset_card.json").read_text())
    assert card["sha256"]["inputs"][f"data/sources/{TINY_SOURCE}"] == sha256(data_file)


def test_template_change_reruns_dataset_onwards(clean_pipeline_repo):
    params = read_params(clean_pipeline_repo)
    params["dataset"]["template"] = "chatml"
    write_params(clean_pipeline_repo, params)
    assert set(dvc_status(clean_pipeline_repo)) == {"dataset"}
    ran = repro(clean_pipeline_repo, "dataset")
    assert ran == {"dataset"}, ran.log
    card = json.loads((clean_pipeline_repo / "data/dataset/dataset_card.json").read_text())
    assert card["template"]["name"] == "chatml"


def test_new_tokenizer_reruns_dataset_but_new_weights_alone_do_not(clean_pipeline_repo, tiny_model_dir, tmp_path):
    """The dataset stage depends on models/tokenizer, not models/base: re-tokenizing follows the tokenizer."""
    import torch
    from safetensors.torch import load_file, save_file

    new_weights = tmp_path / "new-weights"
    shutil.copytree(tiny_model_dir, new_weights)
    weights = load_file(new_weights / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, new_weights / "model.safetensors", metadata={"format": "pt"})
    params = read_params(clean_pipeline_repo)
    params["fetch"]["source"] = f"file://{new_weights}"
    write_params(clean_pipeline_repo, params)
    ran = repro(clean_pipeline_repo, "dataset")
    assert ran == {"fetch", "convert"}, ran.log  # the tokenizer is the same file: dataset is skipped
    assert "dataset" not in dvc_status(clean_pipeline_repo) and "train" in dvc_status(clean_pipeline_repo)

    new_template = tmp_path / "new-template"
    shutil.copytree(new_weights, new_template)
    blank_line_between_turns = CHATML_TEMPLATE.replace("'<|im_end|>' + '\n'", "'<|im_end|>' + '\n\n'")
    (new_template / "chat_template.jinja").write_text(blank_line_between_turns)
    params["fetch"]["source"] = f"file://{new_template}"
    write_params(clean_pipeline_repo, params)
    ran = repro(clean_pipeline_repo, "dataset")
    assert ran == {"fetch", "convert", "dataset"}, ran.log
    first = json.loads((clean_pipeline_repo / "data/dataset/train.jsonl").read_text().splitlines()[0])
    assert "<|im_end|>\n\n<|im_start|>" in first["text"]
    base = load_file(clean_pipeline_repo / "models/base/model.safetensors")
    assert torch.equal(base["model.norm.weight"], weights["model.norm.weight"])


def test_dataset_card_change_alone_retrains_nothing(clean_pipeline_repo):
    """train, merge and evaluate depend on the dataset files they read, not on the whole folder."""
    code = clean_pipeline_repo / "tuneline/data/card.py"
    code.write_text(code.read_text().replace("# Dataset card", "# Dataset card (edited)"))
    ran = repro(clean_pipeline_repo)
    assert ran == {"dataset", "lineage"}, ran.log  # the record notes the folder's new sha256
    assert "(edited)" in (clean_pipeline_repo / "data/dataset/dataset_card.md").read_text()
