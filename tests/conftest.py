"""Shared fixtures: a tiny random Llama with a ChatML BPE tokenizer, tiny params, and DVC pipeline repos.

Everything here is built locally (no network, no real model). A full `dvc repro` of the tiny pipeline costs
about a minute on two cores (every stage is a fresh Python that imports torch), so it runs ONCE per test run,
shared by pytest-xdist's workers (`_built_once`): each module that needs a reproduced pipeline gets a copy of
it (`pipeline_repo`), and `clean_pipeline_repo` hands that copy over clean and, after the test, restores the
committed, fully reproduced state (git restores code, params and the uncached metrics; `dvc checkout` restores
the cached outs), then checks with `dvc repro` that nothing is left to run.
"""

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

from tuneline.pipeline import stage_names

PROJECT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
STAGES = tuple(stage_names(PROJECT))

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "You classify breast tumours from cell-nucleus measurements. Answer with one word: malignant or benign.",
    "Measurements: worst radius 17.33, worst concave points 0.19, worst texture 25.41, mean concavity 0.30. "
    "Is the tumour malignant or benign?",
    "Measurements: worst radius 12.04, worst concave points 0.07, worst texture 19.58, mean concavity 0.02.",
    "malignant benign malignant benign benign malignant",
    "system user assistant measurements radius texture concave points concavity perimeter area smoothness",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 0.01 0.05 0.10 0.25 0.50 1.00 99.99",
    "The quick brown fox jumps over the lazy dog. Hello world, this is a tiny test corpus.",
]

_RAN_STAGE = re.compile(r"Running stage '([^']+)'")
_INTEGRATION = Path(__file__).resolve().parent / "integration"
# The integration files that take longest, in this order, run first, so that `make test`'s two workers finish
# together (with --no-loadscope-reorder, pytest-xdist's --dist loadfile hands a worker the next file in this
# order whenever it is nearly free, and runs each file on one worker). test_repro.py builds the shared reproduced
# pipeline while test_families.py, which needs none, runs beside it.
_LONGEST_FIRST = ("test_repro.py", "test_families.py", "test_faults.py", "test_retrain.py", "test_serve.py",
                  "test_repro_data.py", "test_train_scale.py", "test_sharing.py", "test_chat_cli.py",
                  "test_benchmarks.py", "test_gpu_check.py")
_REPORTS: list[str] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration/ is the integration tier: `pytest -m "not integration"` leaves it out."""
    for item in items:
        if _INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.integration)
    rank = {name: position for position, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


# --------------------------------------------------------------------------------------------------- env


def subprocess_env(prefect_home: Path | None = None) -> dict[str, str]:
    """The environment for stage subprocesses: the venv's python first on PATH, offline, no analytics."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    # `make test` runs two workers on two cores: a stage process with a thread per core would oversubscribe them.
    env["OMP_NUM_THREADS"] = "1"
    env.pop("PREFECT_API_URL", None)
    # Like a user's shell: hash randomization on (tests must not hide order-dependent outputs).
    env.pop("PYTHONHASHSEED", None)
    env.pop("PYTHONPATH", None)
    if prefect_home is not None:
        env["PREFECT_HOME"] = str(prefect_home)
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    return env


@pytest.fixture(scope="session", autouse=True)
def _session_env(tmp_path_factory):
    """In-process env: offline hub, no analytics, a private PREFECT_HOME, no Prefect server URL."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TOKENIZERS_PARALLELISM", "false")
        patch.setenv("DVC_NO_ANALYTICS", "1")
        patch.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
        patch.delenv("PREFECT_API_URL", raising=False)
        yield


@pytest.fixture
def report(request):
    """What a reliability test tried and what survived: printed in the run's summary, "what the tests tried"
    (also from pytest-xdist's workers, whose own output never reaches the terminal)."""

    def emit(text: str) -> None:
        request.node.user_properties.append(("report", text))

    return emit


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _REPORTS.extend(text for key, text in report.user_properties if key == "report")


def pytest_terminal_summary(terminalreporter) -> None:
    if _REPORTS:
        terminalreporter.section("what the tests tried")
        for text in _REPORTS:
            terminalreporter.write_line(text)


def _built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `build(folder)` makes, built once per test run: pytest-xdist's workers share it (the first
    to ask builds it under a file lock, the others wait for it). A failed build leaves nothing behind."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # the run's folder, above each worker's own
    path = root / name
    with FileLock(f"{path}.lock"):
        if not path.is_dir():
            partial = root / f"{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            build(partial)
            partial.rename(path)
    return path


# ------------------------------------------------------------------------------------------- tiny model


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
    )


def tiny_llama_config(tokenizer, **overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.1,  # peakier than the default 0.02, so top-1 comparisons are not near ties
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_tiny_model(out: Path) -> None:
    """A tiny random Llama (2 layers, hidden 64, GQA 4/2 heads) and a ChatML byte-level BPE tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer)).eval()
    model.save_pretrained(out, safe_serialization=True)
    assert (out / "model.safetensors").exists()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny model's folder, one per test run (the shared reproduced pipeline fetches from it)."""
    return _built_once(tmp_path_factory, "tiny-model", build_tiny_model)


TINY_SOURCE = "tiny.jsonl"  # an alpaca-format file under data/sources, beside the real params' sklearn table


def write_tiny_sources(data_dir: Path) -> Path:
    """Write data/sources/tiny.jsonl: 40 alpaca rows (instruction, input on every other row, output)."""
    words = ["malignant", "benign", "radius", "texture", "area", "perimeter", "smoothness", "concavity"]
    rows = [
        {"instruction": f"Repeat the word {words[i % 8]} {i} times.", "input": "" if i % 2 else f"case {i}",
         "output": " ".join([words[i % 8]] * (1 + i % 3))}
        for i in range(40)
    ]
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / TINY_SOURCE
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def tiny_params(tiny_model_dir) -> dict:
    """The repo's params.yaml, shrunk for speed; every key not named here is kept as in the real file.
    The dataset mixes the real sklearn table (labels: accuracy) with a small alpaca file (free text)."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["fetch"]["source"] = f"file://{tiny_model_dir}"
    params["fetch"]["sha256"] = {}
    params["convert"]["dtype"] = "float32"
    params["dataset"]["eval_fraction"] = 0.1
    params["dataset"]["sources"].append({"path": TINY_SOURCE, "format": "alpaca"})
    params["train"].update(max_steps=4, batch_size=4, logging_steps=1)
    params["merge"]["num_prompts"] = 4
    params["export"].update(num_prompts=4, max_new_tokens=8)
    params["evaluate"]["max_examples"] = 0  # every eval row: label (sklearn) and free_text (alpaca) kinds
    params["evaluate"]["generation"]["max_new_tokens"] = 8
    return params


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory, tiny_model_dir, tiny_params) -> Path:
    """The dataset stage's output for the tiny params, tokenized with the tiny model's tokenizer."""
    from transformers import AutoTokenizer

    from tuneline.data import build_dataset, write_outputs
    from tuneline.params import validate_section

    root = tmp_path_factory.mktemp("dataset")
    data_dir = write_tiny_sources(root / "sources").parent
    params = validate_section("dataset", tiny_params["dataset"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    built = build_dataset(params=params, data_dir=data_dir, tokenizer=tokenizer, tokenizer_dir=tiny_model_dir)
    out = root / "dataset"
    out.mkdir()
    write_outputs(built, params, tokenizer, tiny_model_dir, out)
    return out


@pytest.fixture
def params(tiny_params) -> dict:
    """A private deep copy of tiny_params that a test may change."""
    return copy.deepcopy(tiny_params)


# ---------------------------------------------------------------------------------------- pipeline repos


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env or subprocess_env(), capture_output=True, text=True)
    if check:
        assert result.returncode == 0, describe(result)
    return result


def run_stage(stage: str, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m stages.STAGE ARGS` as dvc.yaml runs it, in `cwd` (which holds its params.yaml), with this
    project's stages/ and tuneline/ importable."""
    env = subprocess_env()
    env["PYTHONPATH"] = str(PROJECT)
    return run([sys.executable, "-m", f"stages.{stage}", *args], cwd=cwd, env=env, check=check)


def describe(result: subprocess.CompletedProcess, limit: int = 8000) -> str:
    return (
        f"{' '.join(map(str, result.args))} exited with {result.returncode}\n"
        f"--- stdout (tail) ---\n{result.stdout[-limit:]}\n--- stderr (tail) ---\n{result.stderr[-limit:]}"
    )


def dvc(repo: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    return run([str(VENV_BIN / "dvc"), *args], cwd=repo, check=check)


class Ran(set):
    """The names of the stages that ran; `.log` is DVC's output, for assertion messages."""

    log: str = ""


def repro(repo: Path, *args: str) -> Ran:
    """`dvc repro ARGS` in `repo`; it must succeed. Returns the set of the stages that actually ran."""
    result = dvc(repo, "repro", *args)
    assert result.returncode == 0, describe(result)
    ran = Ran(_RAN_STAGE.findall(result.stdout + result.stderr))
    ran.log = describe(result)
    return ran


def ran_stages(result: subprocess.CompletedProcess) -> set[str]:
    return set(_RAN_STAGE.findall(result.stdout + result.stderr))


def dvc_status(repo: Path) -> dict:
    result = dvc(repo, "status", "--json")
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout or "{}")


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run(["git", *args], cwd=repo)


def commit_all(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    if git(repo, "status", "--porcelain").stdout.strip():
        git(repo, "commit", "-q", "-m", message)


def read_params(repo: Path) -> dict:
    return yaml.safe_load((repo / "params.yaml").read_text())


def write_params(repo: Path, params: dict) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def make_pipeline_repo(dest: Path, params: dict) -> Path:
    """A git + DVC repo holding the project's pipeline (dvc.yaml, stages, tuneline, flows) and `params`."""
    dest.mkdir(parents=True)
    shutil.copy2(PROJECT / "dvc.yaml", dest / "dvc.yaml")
    for package in ("stages", "tuneline", "flows"):
        shutil.copytree(PROJECT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    write_params(dest, params)
    write_tiny_sources(dest / "data" / "sources")
    (dest / ".gitignore").write_text("__pycache__/\n*.pyc\n")
    git(dest, "init", "-q")
    git(dest, "config", "user.email", "tests@tuneline.invalid")
    git(dest, "config", "user.name", "tuneline tests")
    git(dest, "config", "commit.gpgsign", "false")
    dvc(dest, "init", "-q", check=True)
    dvc(dest, "config", "core.analytics", "false", check=True)
    dvc(dest, "config", "core.check_update", "false", check=True)
    commit_all(dest, "tiny pipeline")
    return dest


def restore(repo: Path) -> None:
    """Back to the last commit (a clean, fully reproduced state): code, params, lock, metrics and outs."""
    git(repo, "checkout", "-q", "-f", "HEAD", "--", ".")
    git(repo, "clean", "-fdq")
    result = dvc(repo, "checkout", "--force")
    assert result.returncode == 0, describe(result)
    repro(repo)  # whatever the checkout could not bring back is rebuilt here
    commit_all(repo, "restored")


@pytest.fixture(scope="session")
def reproduced_template(tmp_path_factory, tiny_params) -> Path:
    """The tiny pipeline, reproduced by its first full `dvc repro` and committed, once per test run: `repo/`,
    and `ran.json`, what that repro ran and its log. Tests work on copies (`copy_pipeline_repo`)."""

    def build(folder: Path) -> None:
        repo = make_pipeline_repo(folder / "repo", tiny_params)
        ran = repro(repo)
        commit_all(repo, "reproduced")
        (folder / "ran.json").write_text(json.dumps({"stages": sorted(ran), "log": ran.log}))

    return _built_once(tmp_path_factory, "reproduced-pipeline", build)


def copy_pipeline_repo(template: Path, dest: Path) -> Path:
    """A copy of the reproduced tiny pipeline (git history, DVC cache and outs), like a second working copy;
    DVC's temporary state (.dvc/tmp: locks, experiment queues) stays behind."""
    source = template / "repo"
    shutil.copytree(source, dest, symlinks=True,
                    ignore=lambda folder, names: ["tmp"] if Path(folder) == source / ".dvc" else [])
    return dest


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory, reproduced_template) -> Path:
    """This module's copy of the reproduced tiny pipeline (see `clean_pipeline_repo`)."""
    return copy_pipeline_repo(reproduced_template, tmp_path_factory.mktemp("pipeline") / "repo")


@pytest.fixture(scope="session")
def reproduced_pipeline(reproduced_template) -> Ran:
    """The stages the first full `dvc repro` of the tiny pipeline ran (`.log`: its output)."""
    recorded = json.loads((reproduced_template / "ran.json").read_text())
    ran = Ran(recorded["stages"])
    ran.log = recorded["log"]
    return ran


@pytest.fixture
def clean_pipeline_repo(pipeline_repo) -> Path:
    """The session repo, clean and fully reproduced; whatever the test changes is undone afterwards."""
    yield pipeline_repo
    restore(pipeline_repo)


# ----------------------------------------------------------------------------------------- tiny adapters


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory, tiny_model_dir, tiny_params, tiny_dataset_dir) -> tuple[Path, dict, Path]:
    """train() for 3 steps on the tiny model: (adapter dir, returned metrics, DVCLive dir)."""
    from dvclive import Live

    from tuneline.params import TrainParams
    from tuneline.training import train

    root = tmp_path_factory.mktemp("train")
    params = TrainParams(**{**tiny_params["train"], "max_steps": 3})
    adapter_dir = root / "adapter"
    live_dir = root / "live"
    with Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False) as live:
        metrics = train(base_dir=tiny_model_dir, dataset_dir=tiny_dataset_dir, params=params, adapter_dir=adapter_dir,
                        live=live, run_dir=root / "checkpoints")
    return adapter_dir, metrics, live_dir


def perturb_lora_b(adapter_dir: Path) -> None:
    """Set the adapter's LoRA B to sizeable random values, so that the merge delta matters."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(adapter_dir / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(1)
    changed = 0
    for name, tensor in weights.items():
        if "lora_B" in name:
            weights[name] = (torch.randn(tensor.shape, generator=generator) * 0.05).to(tensor.dtype)
            changed += 1
    assert changed > 0
    save_file(weights, adapter_dir / "adapter_model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="session")
def perturbed_adapter(tmp_path_factory, trained_adapter) -> Path:
    """The trained adapter with LoRA B set to sizeable random values, so the merge delta matters."""
    adapter_dir = tmp_path_factory.mktemp("adapter") / "adapter"
    shutil.copytree(trained_adapter[0], adapter_dir)
    perturb_lora_b(adapter_dir)
    return adapter_dir
