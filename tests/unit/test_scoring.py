"""tuneline/scoring.py and eval_report.py: likelihood scoring, generation in every decoding mode, each metric kind
on outputs with known answers (a perfect, a wrong and a malformed output each give the expected figure),
multiple-choice answering scored as labels, lm-evaluation-harness on a local task, the eval pages."""

import json
import math
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml

from tuneline.errors import TunelineError
from tuneline.params import MCQ_INSTRUCTIONS, LmEvalParams, validate_section


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from tuneline.modeling import load_full_model

    return load_full_model(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def eval_rows(tiny_dataset_dir):
    from tuneline.modeling import read_split

    return read_split(tiny_dataset_dir / "eval.parquet")


def direct_logprob(model, ids: list[int], start: int, end: int) -> float:
    """The plain definition: sum over tokens start..end-1 of log p(token | everything before), one row alone."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    log_probs = torch.log_softmax(logits, -1)
    return sum(log_probs[t - 1, ids[t]].item() for t in range(start, end))


class TestEvaluate:
    PAD = 0  # the tiny tokenizer's <|endoftext|>

    def test_left_padded_batch_equals_rows_alone_and_direct_computation(self, tiny_model, eval_rows):
        from tuneline.scoring import completion_logprobs

        pairs = [
            (list(row.input_ids[: row.prompt_length - cut]), list(ids))
            for cut, row in zip((0, 7, 15), eval_rows[eval_rows["label"].notna()].itertuples())
            for ids in row.choice_ids
        ]
        assert len({len(prompt) for prompt, _ in pairs}) == 3  # really different lengths
        batched = completion_logprobs(tiny_model, self.PAD, pairs, batch_size=len(pairs), desc="batched")
        alone = completion_logprobs(tiny_model, self.PAD, pairs, batch_size=1, desc="alone")
        for (prompt, completion), lp_batched, lp_alone in zip(pairs, batched, alone):
            assert lp_batched == pytest.approx(lp_alone, abs=1e-4)
            ids = prompt + completion
            assert lp_alone == pytest.approx(direct_logprob(tiny_model, ids, len(prompt), len(ids)), abs=1e-4)

    def test_answer_loss_is_the_mean_over_trained_tokens(self, tiny_model, eval_rows):
        from tuneline.scoring import answer_losses, mean_loss

        rows = eval_rows.iloc[:5]
        total = tokens = 0
        for row in rows.itertuples():
            trained = [t for t, label in enumerate(row.labels) if label != -100]
            total -= sum(direct_logprob(tiny_model, list(row.input_ids), t, t + 1) for t in trained)
            tokens += len(trained)
        losses = answer_losses(tiny_model, self.PAD, rows, batch_size=3, desc="loss")
        assert mean_loss(losses) == pytest.approx(total / tokens, rel=1e-4)

    def test_classify_picks_the_most_likely_choice(self, tiny_model, eval_rows):
        from tuneline.scoring import classify

        rows = eval_rows[eval_rows["label"].notna()].iloc[:6]
        predicted = classify(tiny_model, self.PAD, rows, batch_size=4, desc="classify")
        assert len(predicted) == len(rows)
        for row, prediction in zip(rows.itertuples(), predicted):
            prompt = list(row.input_ids[: row.prompt_length])
            scores = {choice: direct_logprob(tiny_model, prompt + list(ids), len(prompt), len(prompt) + len(ids))
                      for choice, ids in zip(row.choices, row.choice_ids)}
            assert prediction == max(scores, key=scores.get)

    def test_logistic_regression_baseline(self, tiny_dataset_dir, eval_rows):
        from tuneline.scoring import logistic_regression_accuracy
        from tuneline.modeling import read_split

        train = read_split(tiny_dataset_dir / "train.parquet")
        accuracy = logistic_regression_accuracy(train[train["features"].notna()], eval_rows[eval_rows["features"].notna()])
        assert 0.8 <= accuracy <= 1.0


# ----------------------------------------------------------------------------------------------- metrics


class TestFreeText:
    def test_exact_match_ignores_case_and_spacing_only(self):
        from tuneline.scoring import exact_match

        assert exact_match(["Paris", "  the  Moon ", "Madrid."], ["paris", "the moon", "Madrid"]) == pytest.approx(2 / 3)
        assert exact_match(["Rome"], ["Paris"]) == 0.0

    @pytest.mark.parametrize(
        "output, reference, expected",
        [
            ("the cat sat on the mat", "the cat sat on the mat", 1.0),  # perfect
            ("dogs bark loudly", "the cat sat", 0.0),  # wrong
            ("", "the cat sat", 0.0),  # malformed (empty)
            # LCS "the cat on the mat" = 5 words; precision 5/6, recall 5/6
            ("the cat lay on the mat", "the cat sat on the mat", 5 / 6),
            # LCS "cat mat" = 2; precision 2/2, recall 2/6 -> F1 = 2 * 1 * (1/3) / (4/3) = 0.5
            ("cat mat", "the cat sat on the mat", 0.5),
        ],
    )
    def test_rouge_l(self, output, reference, expected):
        from tuneline.scoring import rouge_l

        assert rouge_l(output, reference) == pytest.approx(expected)


REFERENCE_MCQ = "Question: What falls from clouds?\nA. snow\nB. sand\nC. salt\nD. sun\nAnswer: A"


class TestMcq:
    @pytest.mark.parametrize(
        "output, valid",
        [
            (REFERENCE_MCQ, True),
            ("Question: Which is hot?\nA. ice\nB. fire\nC. snow\nD. rain\nAnswer: B", True),
            ("Question: Which is hot?\nA. ice\nB. fire\nC. snow\nAnswer: B", False),  # three options
            ("Question: Which is hot?\nA. ice\nB. ice\nC. snow\nD. rain\nAnswer: B", False),  # options not distinct
            ("Question: Which is hot?\nA. ice\nB. fire\nC. snow\nD. rain", False),  # no key
            ("Question: Which is hot?\nA. ice\nB. fire\nC. snow\nD. rain\nAnswer: E", False),  # key not A-D
            ("fire", False),
        ],
    )
    def test_parse_mcq(self, output, valid):
        from tuneline.scoring import parse_mcq

        parsed = parse_mcq(output)
        assert (parsed is not None) == valid
        if valid:
            assert parsed["key"] in "ABCD" and len(parsed["options"]) == 4

    def test_scores_for_perfect_wrong_key_and_malformed_outputs(self):
        from tuneline.scoring import mcq_scores

        wrong_key = REFERENCE_MCQ.replace("Answer: A", "Answer: C")
        malformed = "Question: What falls from clouds?\nA. snow"
        assert mcq_scores([REFERENCE_MCQ], [REFERENCE_MCQ]) == {"mcq_format_valid": 1.0, "mcq_key_accuracy": 1.0}
        assert mcq_scores([wrong_key], [REFERENCE_MCQ]) == {"mcq_format_valid": 1.0, "mcq_key_accuracy": 0.0}
        assert mcq_scores([malformed], [REFERENCE_MCQ]) == {"mcq_format_valid": 0.0, "mcq_key_accuracy": 0.0}
        scores = mcq_scores([REFERENCE_MCQ, wrong_key, malformed], [REFERENCE_MCQ] * 3)
        assert scores == {"mcq_format_valid": pytest.approx(2 / 3), "mcq_key_accuracy": pytest.approx(1 / 3)}
        # without a reference key there is no key accuracy to report
        assert mcq_scores([REFERENCE_MCQ], ["a free-text reference"]) == {"mcq_format_valid": 1.0}


class TestLabel:
    def test_accuracy_and_macro_f1(self):
        from tuneline.scoring import label_scores

        truth = ["benign", "benign", "malignant", "malignant"]
        assert label_scores(truth, truth) == {"accuracy": 1.0, "macro_f1": 1.0}
        assert label_scores(["malignant", "malignant", "benign", "benign"], truth) == {"accuracy": 0.0, "macro_f1": 0.0}
        # all "benign": accuracy 0.5; F1 benign = 2/3, malignant = 0 -> macro 1/3
        scores = label_scores(["benign"] * 4, truth)
        assert scores["accuracy"] == 0.5 and scores["macro_f1"] == pytest.approx(1 / 3)


MCQ_ANSWER_ROWS = [  # A-D columns; the answer as a letter or as an index (0-3); each letter four times
    {"question": f"Which word is number {n}?", "A": f"radius {n}", "B": f"texture {n}", "C": f"area {n}",
     "D": f"perimeter {n}", "answer": "ABCD"[n % 4] if n % 2 else n % 4}
    for n in range(16)
]


@pytest.fixture(scope="module")
def answer_dataset(tmp_path_factory, tiny_model_dir, tiny_params) -> Path:
    """The dataset stage's output for one mcq source with task: answer; half of it (two rows a letter) eval."""
    from transformers import AutoTokenizer

    from tuneline.data import build_dataset, write_outputs

    root = tmp_path_factory.mktemp("mcq-answer")
    (root / "sources").mkdir()
    (root / "sources" / "mcq.jsonl").write_text("".join(json.dumps(row) + "\n" for row in MCQ_ANSWER_ROWS))
    sources = [{"path": "mcq.jsonl", "format": "mcq", "task": "answer"}]
    params = validate_section("dataset", {**tiny_params["dataset"], "sources": sources, "system_prompt": "",
                                          "balance": False, "eval_fraction": 0.5, "max_length": 1024})
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    built = build_dataset(params=params, data_dir=root / "sources", tokenizer=tokenizer, tokenizer_dir=tiny_model_dir)
    (root / "dataset").mkdir()
    write_outputs(built, params, tokenizer, tiny_model_dir, root / "dataset")
    return root / "dataset"


@pytest.fixture(scope="module")
def answer_rows(answer_dataset):
    from tuneline.modeling import read_split

    return read_split(answer_dataset / "eval.parquet")


class TestMcqAnswering:
    """An mcq source with `task: answer`: the model reads the question and its four options and answers with
    the letter, which evaluation scores like any label, by each letter's likelihood."""

    def test_the_model_sees_the_question_and_its_options_and_answers_with_the_letter(self, answer_rows):
        row = answer_rows.iloc[0]
        n = int(row["ref"].rsplit(":", 1)[1]) - 1  # ".../mcq.jsonl:3" is MCQ_ANSWER_ROWS[2]
        assert row["question"] == (
            f"{MCQ_INSTRUCTIONS['answer']}\n\nQuestion: Which word is number {n}?\n"
            f"A. radius {n}\nB. texture {n}\nC. area {n}\nD. perimeter {n}"
        )
        assert row["reference"] == row["label"] == "ABCD"[n % 4]
        assert set(answer_rows["kind"]) == {"label"}  # scored like labels: accuracy and macro-F1
        assert list(row["choices"]) == ["A", "B", "C", "D"]
        assert sorted(answer_rows["label"]) == ["A", "A", "B", "B", "C", "C", "D", "D"]

    def test_accuracy_and_macro_f1_of_the_most_likely_letter(self, tiny_model_dir, answer_dataset, answer_rows,
                                                             tiny_params):
        from tuneline.modeling import load_full_model, load_tokenizer
        from tuneline.scoring import score_model

        letter_b = {int(row.choice_ids[1][0]) for row in answer_rows.itertuples()}
        assert len(letter_b) == 1  # every row's "B" answer starts with the same token
        model = load_full_model(tiny_model_dir).eval()
        bias = torch.zeros(model.config.vocab_size)
        bias[letter_b.pop()] = 1000.0
        model.lm_head.register_forward_hook(lambda module, inputs, logits: logits + bias)  # a model that says "B"
        params = validate_section("evaluate", {**tiny_params["evaluate"], "max_examples": 0})
        figures, outputs = score_model(model, load_tokenizer(answer_dataset / "tokenizer"), answer_rows, params, "B")
        assert outputs["labels"] == ["B"] * 8
        # truth A, B, C, D twice each, all answered B: accuracy 2/8; F1 of B = 2PR/(P+R) with P = 2/8 and R = 1,
        # 0.4; of A, C and D 0; macro-F1 0.4 / 4
        assert figures["accuracy"] == 0.25
        assert figures["macro_f1"] == pytest.approx(0.1)


class TestMergedMatchesQlora:
    METRICS = {"accuracy": {"base": 0.5, "qlora": 0.9, "merged": 0.9, "logistic_regression": 0.93},
               "eval_loss": {"base": 5.2, "qlora": 0.2, "merged": 0.2000001}, "examples": {"label": 10}}

    def test_an_exact_merge_allows_no_change_in_rates(self):
        from tuneline.scoring import merge_tolerances, merged_vs_qlora

        tolerances = merge_tolerances({"kl": 3e-11, "top1_agreement": 1.0}, max_new_tokens=16)
        assert tolerances["rate"] == 0.0
        assert merged_vs_qlora(self.METRICS, tolerances) == []
        drifted = {**self.METRICS, "accuracy": {**self.METRICS["accuracy"], "merged": 0.8}}
        problems = merged_vs_qlora(drifted, tolerances)
        assert len(problems) == 1 and problems[0].startswith("accuracy: merged 0.8 vs QLoRA 0.9")

    def test_a_lossy_merge_allows_what_it_predicts(self):
        from tuneline.scoring import merge_tolerances, merged_vs_qlora

        tolerances = merge_tolerances({"kl": 0.49, "top1_agreement": 0.70}, max_new_tokens=1)
        drifted = {**self.METRICS, "accuracy": {**self.METRICS["accuracy"], "merged": 0.8},
                   "eval_loss": {**self.METRICS["eval_loss"], "merged": 0.5}}
        assert merged_vs_qlora(drifted, tolerances) == []  # 0.1 < 0.3 and 0.3 < 10 * sqrt(0.49)


# --------------------------------------------------------------------------------------------- generation


def generation_params(**changes):
    from tuneline.params import GenerationParams

    defaults = dict(mode="greedy", max_new_tokens=6, num_beams=3, temperature=0.8, top_k=20, top_p=0.9,
                    repetition_penalty=1.0, seed=7)
    return GenerationParams(**(defaults | changes))


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_dataset_dir):
    from tuneline.modeling import load_tokenizer

    return load_tokenizer(tiny_dataset_dir / "tokenizer")


@pytest.fixture(scope="module")
def prompts(eval_rows) -> list[list[int]]:
    """Prompts of different lengths, so batches are really left-padded."""
    return [list(row.input_ids[: row.prompt_length - cut]) for cut, row in zip((0, 9, 4), eval_rows.itertuples())]


class TestGeneration:
    @pytest.mark.parametrize("mode", ["greedy", "beam", "sample"])
    def test_every_decoding_mode_answers_every_prompt(self, tiny_model, tiny_tokenizer, prompts, mode):
        from tuneline.scoring import generate

        assert len({len(prompt) for prompt in prompts}) == 3
        answers = generate(tiny_model, tiny_tokenizer, prompts, generation_params(mode=mode), batch_size=3, desc=mode)
        assert len(answers) == len(prompts) and all(isinstance(answer, str) for answer in answers)
        again = generate(tiny_model, tiny_tokenizer, prompts, generation_params(mode=mode), batch_size=3, desc=mode)
        assert again == answers  # sampling too: the seed is in params

    def test_greedy_batched_with_left_padding_equals_one_prompt_at_a_time(self, tiny_model, tiny_tokenizer, prompts):
        from tuneline.scoring import generate

        params = generation_params(max_new_tokens=5)
        batched = generate(tiny_model, tiny_tokenizer, prompts, params, batch_size=3, desc="batched")
        alone = [generate(tiny_model, tiny_tokenizer, [prompt], params, batch_size=1, desc="alone")[0] for prompt in prompts]
        assert batched == alone
        # and greedy is the argmax, token by token
        ids = list(prompts[0])
        for _ in range(5):
            with torch.no_grad():
                ids.append(int(tiny_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        new = ids[len(prompts[0]):]
        ends = [i for i, token in enumerate(new) if token == tiny_tokenizer.eos_token_id]
        assert alone[0] == tiny_tokenizer.decode(new[: ends[0] if ends else None], skip_special_tokens=True).strip()

    def test_sampling_seed_changes_the_draw(self, tiny_model, tiny_tokenizer, prompts):
        from tuneline.scoring import generate

        draws = {tuple(generate(tiny_model, tiny_tokenizer, prompts, generation_params(mode="sample", temperature=2.0,
                                                                                      top_k=0, top_p=1.0, seed=seed),
                                batch_size=3, desc="sample")) for seed in range(4)}
        assert len(draws) > 1

    def test_decoding_options_follow_the_mode(self):
        from tuneline.scoring import decoding_options

        assert decoding_options(generation_params(mode="greedy")) == {
            "max_new_tokens": 6, "repetition_penalty": 1.0, "do_sample": False, "num_beams": 1}
        assert decoding_options(generation_params(mode="beam"))["num_beams"] == 3
        sample = decoding_options(generation_params(mode="sample"))
        assert sample["do_sample"] is True and (sample["temperature"], sample["top_k"], sample["top_p"]) == (0.8, 20, 0.9)


# -------------------------------------------------------------------------------------- the whole stage


@pytest.fixture(scope="module")
def stage_result(tiny_model_dir, trained_adapter, tiny_dataset_dir, tiny_params):
    """evaluate() on the tiny model with the tiny params' evaluate section (every eval row, all kinds)."""
    from tuneline.scoring import evaluate

    params = validate_section("evaluate", {**tiny_params["evaluate"], "max_examples": 0})
    return evaluate(base_dir=tiny_model_dir, adapter_dir=trained_adapter[0], merged_dir=tiny_model_dir,
                    dataset_dir=tiny_dataset_dir, merge_metrics={"kl": 1e-12, "top1_agreement": 1.0}, params=params)


class TestEvaluateStage:
    def test_figures_per_kind_for_every_model(self, stage_result):
        metrics, rows, outputs = stage_result
        assert set(metrics["examples"]) == {"label", "free_text"} and sum(metrics["examples"].values()) == len(rows)
        for name in ("eval_loss", "accuracy", "macro_f1", "exact_match", "rouge_l", "answer_loss", "perplexity"):
            assert set(metrics[name]) >= {"base", "qlora", "merged"}, name
        assert "logistic_regression" in metrics["accuracy"]
        assert metrics["perplexity"]["base"] == pytest.approx(math.exp(metrics["answer_loss"]["base"]))
        assert all(len(outputs[name]["answers"]) == len(rows) for name in ("base", "qlora", "merged"))
        # the "merged" model here is the base itself, so it does not match the QLoRA model: flagged
        assert metrics["merged_matches_qlora"] is False

    def test_eval_dir_tables(self, stage_result, tmp_path):
        from tuneline.eval_report import write_eval_dir

        _, rows, outputs = stage_result
        write_eval_dir(tmp_path, rows, outputs)
        table = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
        assert len(table) == len(rows)
        assert set(table[0]) == {"ref", "kind", "question", "reference", "base", "qlora", "merged"}
        assert table[0]["reference"] == rows.iloc[0]["reference"]
        page = (tmp_path / "generations.html").read_text()
        assert page.count("<tr>") == len(rows) + 1 and "&lt;" not in page.split("<table")[0]
        predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
        assert len(predictions) == (rows["kind"] == "label").sum()
        confusion = json.loads((tmp_path / "confusion.json").read_text())
        assert confusion == [{"actual": p["label"], "predicted": p["merged"]} for p in predictions]

    def test_kind_override(self, eval_rows, tiny_params):
        from tuneline.scoring import select_rows

        params = validate_section("evaluate", {**tiny_params["evaluate"], "max_examples": 0, "kind": "free_text"})
        assert set(select_rows(eval_rows, params)["kind"]) == {"free_text"}
        labelled_only = validate_section("evaluate", {**tiny_params["evaluate"], "max_examples": 0, "kind": "label"})
        with pytest.raises(TunelineError, match=r"evaluate\.kind: label needs a label on every eval row"):
            select_rows(eval_rows, labelled_only)

    def test_lm_eval_is_skipped_cleanly_without_the_extra(self, tmp_path, capsys, monkeypatch):
        import builtins

        from tuneline.scoring import load_lm_eval_tasks, run_lm_eval

        assert run_lm_eval(tmp_path, LmEvalParams(tasks=[], limit=5), batch_size=2) == {}
        real_import = builtins.__import__

        def without_lm_eval(name, *args, **kwargs):
            if name == "lm_eval":
                raise ImportError("No module named 'lm_eval'")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", without_lm_eval)  # as in an install without the extra
        assert load_lm_eval_tasks(LmEvalParams(tasks=["arc_easy"], limit=5)) is None  # nothing to check up front
        assert run_lm_eval(tmp_path, LmEvalParams(tasks=["arc_easy"], limit=5), batch_size=2) == {
            "lm_eval_skipped": "not installed"}
        assert "pip install 'tuneline[lm-eval]'" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- lm-eval

LOCAL_TASK = "tuneline_tiny_letters"
LOCAL_DOCS = [  # the answer is an option's index; two of the four are the first option
    {"question": "first?", "answer": 0}, {"question": "also first?", "answer": 0},
    {"question": "second?", "answer": 1}, {"question": "last?", "answer": 3},
]


def write_local_task(folder: Path, name: str, data_file: Path) -> Path:
    """A multiple-choice task YAML for lm-eval whose data is a local JSON Lines file: options a-d after
    "Answer:", one token each, the target an index."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(folder.parent / "hf-cache")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": ["a", "b", "c", "d"],
        "doc_to_target": "answer",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc"}],
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.fixture(scope="module")
def lm_eval():
    pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed (pip install 'tuneline[lm-eval]')")
    import lm_eval.tasks

    return lm_eval


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A folder of two local tasks: LOCAL_TASK, and one whose data file does not exist."""
    root = tmp_path_factory.mktemp("lm-eval")
    (root / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in LOCAL_DOCS))
    write_local_task(root / "tasks", LOCAL_TASK, root / "docs.jsonl")
    return write_local_task(root / "tasks", "tuneline_tiny_no_data", root / "absent.jsonl")


@pytest.fixture(scope="module")
def uniform_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its output layer zeroed: every token equally likely, so every option ties."""
    from tuneline.modeling import load_full_model

    out = tmp_path_factory.mktemp("uniform-model")
    model = load_full_model(tiny_model_dir)
    torch.nn.init.zeros_(model.lm_head.weight)
    model.save_pretrained(out)
    for tokenizer_file in tiny_model_dir.glob("*token*"):
        shutil.copy2(tokenizer_file, out)
    return out


class TestLmEval:
    @pytest.fixture(autouse=True)
    def only_local_tasks(self, lm_eval, monkeypatch):
        """lm-eval indexes its ~14,000 built-in task YAMLs in 20-40 s on two cores: here, the local ones only."""
        monkeypatch.setattr(lm_eval.tasks, "TaskManager", partial(lm_eval.tasks.TaskManager, include_defaults=False))

    def test_a_local_task_runs_on_a_machine_without_cuda(self, task_dir, uniform_model_dir):
        from tuneline.scoring import lm_eval_device, run_lm_eval

        assert lm_eval_device() == ("cuda" if torch.cuda.is_available() else "cpu")  # lm-eval's default: cuda
        params = LmEvalParams(tasks=[LOCAL_TASK], limit=4, include_path=str(task_dir))
        # Every option ties, and lm-eval then picks the first: accuracy is the share of first-option answers.
        assert run_lm_eval(uniform_model_dir, params, batch_size=2) == {f"lm_eval_{LOCAL_TASK}_acc": 0.5}

    def test_an_unknown_task_is_one_line_before_any_model_is_scored(self, task_dir, tiny_dataset_dir, tiny_params,
                                                                   tmp_path):
        from tuneline.scoring import evaluate

        lm_eval_params = {"tasks": ["tuneline_tiny_leters"], "limit": 4, "include_path": str(task_dir)}
        params = validate_section("evaluate", {**tiny_params["evaluate"], "lm_eval": lm_eval_params})
        absent = tmp_path / "no-model"  # scoring any model first would fail on it instead
        with pytest.raises(TunelineError) as error:
            evaluate(base_dir=absent, adapter_dir=absent, merged_dir=absent, dataset_dir=tiny_dataset_dir,
                     merge_metrics={"kl": 0.0, "top1_agreement": 1.0}, params=params)
        assert str(error.value) == (
            "params.yaml: evaluate.lm_eval.tasks: 'tuneline_tiny_leters' is not an lm-eval task (did you mean "
            "'tuneline_tiny_letters'?); `lm-eval ls tasks` lists them, and evaluate.lm_eval.include_path adds a "
            "folder of your own task YAMLs"
        )

    def test_a_task_whose_data_cannot_be_fetched_is_one_line(self, task_dir):
        from tuneline.scoring import load_lm_eval_tasks

        params = LmEvalParams(tasks=[LOCAL_TASK, "tuneline_tiny_no_data"], limit=4, include_path=str(task_dir))
        with pytest.raises(TunelineError) as error:
            load_lm_eval_tasks(params)
        message = str(error.value)
        assert message.startswith("params.yaml: evaluate.lm_eval.tasks: 'tuneline_tiny_no_data' cannot load its data (")
        assert message.endswith("); run it once where the Hugging Face hub is reachable (the cache keeps the data), "
                                "or give it local data files in a task YAML under evaluate.lm_eval.include_path")
        assert "\n" not in message

    def test_an_include_path_that_is_not_a_folder(self, tmp_path):
        from tuneline.scoring import load_lm_eval_tasks

        params = LmEvalParams(tasks=[LOCAL_TASK], limit=4, include_path=str(tmp_path / "my-tasks"))
        with pytest.raises(TunelineError) as error:
            load_lm_eval_tasks(params)
        assert str(error.value) == (
            f"params.yaml: evaluate.lm_eval.include_path: '{tmp_path}/my-tasks' is not a folder; point it at the "
            f"folder that holds your task YAMLs (relative to the pipeline's root)"
        )
