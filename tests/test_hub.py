"""Publishing to the Hub: the real `huggingface_hub` client against the project's own Hub server (tests/hub_server.py),
on the loopback interface, started and stopped per test. Nothing is mocked and nothing leaves the machine.

The client reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET when `huggingface_hub` is imported. Processes
started here get them as environment variables; in this test process (which imported it long ago) the `hub` fixture
sets the same three module constants for the duration of a test, the documented equivalent.
"""

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_matta import MatGPT2Config, MatGPT2LMHeadModel
from hf_matta.cards import _training_section
from hf_matta.cli import main
from hf_matta.data import DataArguments
from hf_matta.extract import extract_student
from hf_matta.hub import LINEAGE_FILE, PublishError, build_lineage, publish_students, read_lineage, write_lineage
from hf_matta.training_args import MatTATrainingArguments
from hf_matta.widths import format_plan, plan_name

from .conftest import VOCAB, tiny_kwargs
from .hub_server import HubServer, validate_card_metadata


TOKEN = "hf_test_alice_0123456789abcdef"  # the secret that must appear in no output, card, file or error
USERS = {
    "alice": {"token": TOKEN, "orgs": ["matta-org"]},
    "reader": {"token": "hf_test_reader_read_only", "role": "read"},
}
ORG = "matta-org"
GRANULARITIES = [16, 32, 64]
PLANS = {"student": (16, 16), "ta": (64, 64), "mixed": (16, 64)}  # two uniform students and one mixed
ARGV_PLANS = [arg for plan in PLANS.values() for arg in ("--plan", ",".join(map(str, plan)))]
REPOS = {
    "student": f"{ORG}/gpt2-matta-16.1K-ffn16",
    "ta": f"{ORG}/gpt2-matta-22.4K-ffn64",
    "mixed": f"{ORG}/gpt2-matta-19.2K-ffn16-64",
}
# The client's own environment in a fresh process: no token of the machine, caches in a test folder.
CLIENT_ENV_CLEARED = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Words `w0`..`w97` and `<|endoftext|>`: a real tokenizer whose ids fit the tiny vocabulary."""
    vocab = {f"w{idx}": idx for idx in range(VOCAB - 1)} | {"<|endoftext|>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="<|endoftext|>")


def lineage_arguments(output_dir: Path, **training) -> tuple:
    """The three argument dataclasses of a run grown from GPT-2 with a Hub teacher and a local tokenizer folder."""
    model_args = types.SimpleNamespace(
        model_name_or_path="openai-community/gpt2",
        tokenizer_name_or_path=str(output_dir),
        teacher_pretrain_config=None,
    )
    data_args = DataArguments(
        dataset_name="HuggingFaceFW/fineweb-edu", dataset_config_name="sample-10BT", block_size=64
    )
    training_args = MatTATrainingArguments(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to="none",
        teacher_model_name_or_path="openai-community/gpt2-xl",
        **training,
    )
    return model_args, data_args, training_args


@pytest.fixture(scope="module")
def nested_dir(tmp_path_factory) -> Path:
    """A tiny nested model (granularities 16, 32, 64) saved with its tokenizer and lineage, as training leaves it."""
    folder = tmp_path_factory.mktemp("nested")
    torch.manual_seed(0)
    model = MatGPT2LMHeadModel(MatGPT2Config(**tiny_kwargs(), mat_widths=GRANULARITIES, student_width=16))
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    write_lineage(folder, *lineage_arguments(folder), model.config, steps=100)
    return folder


def point_client_at(server: HubServer, monkeypatch, tmp_path: Path) -> None:
    """This process's client as HF_ENDPOINT=server, HF_HUB_DISABLE_XET=1, no offline mode, HF_TOKEN=TOKEN and no
    login cache would configure it at import."""
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    for name in CLIENT_ENV_CLEARED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


@pytest.fixture
def hub(monkeypatch, tmp_path) -> HubServer:
    """A fresh Hub on the loopback interface, with this process's client pointed at it."""
    with HubServer(USERS) as server:
        point_client_at(server, monkeypatch, tmp_path)
        yield server
        assert server.unknown == [], f"the client called endpoints the test Hub lacks: {server.unknown}"
        assert server.crashes == [], f"the test Hub failed on: {server.crashes}"


def publish(nested_dir: Path, *extra: str) -> int:
    """`hf-matta publish` of the three students to ORG, in this process."""
    return main(["publish", str(nested_dir), "--org", ORG, *ARGV_PLANS, *extra])


def client_process(
    hub: HubServer, tmp_path: Path, code: str, token: str | None = TOKEN
) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python whose `huggingface_hub` talks to `hub` (environment variables only)."""
    env = {key: value for key, value in os.environ.items() if key not in CLIENT_ENV_CLEARED}
    env.update(hub.client_env(token), HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )


def files_at(server: HubServer, repo_id: str) -> dict[str, bytes]:
    """A repo's files, with the server's address (in the cards' links) written as `<hub>`."""
    return {path: content.replace(server.url.encode(), b"<hub>") for path, content in server.files(repo_id).items()}


def progress(output: str) -> list[tuple[str, str]]:
    """(status, repo id) of each student's progress line."""
    words = [line.split() for line in output.splitlines()]
    return [(w[0], w[1]) for w in words if w and w[0] in ("created", "updated", "unchanged", "written")]


def assert_no_secret_or_path(text: str, *paths: Path) -> None:
    assert TOKEN not in text
    for path in (*paths, Path.home()):
        assert str(path) not in text, f"local path {path} leaked"


# --- the lineage ------------------------------------------------------------------------------------------------


def test_lineage_names_hub_ids_and_no_local_path_or_token(tmp_path):
    config = MatGPT2Config(**tiny_kwargs(), mat_widths=GRANULARITIES, student_width=16)
    args = lineage_arguments(tmp_path, hub_token=TOKEN, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    path = write_lineage(tmp_path / "run", *args, config, steps=30)
    text = path.read_text()
    assert_no_secret_or_path(text, tmp_path)
    lineage = read_lineage(tmp_path / "run")
    assert lineage["base_model"] == "openai-community/gpt2"
    assert lineage["teacher"] == "openai-community/gpt2-xl"
    assert lineage["tokenizer"] == "local"  # a folder of this machine is named as local, never by its path
    assert lineage["data"]["datasets"] == ["HuggingFaceFW/fineweb-edu"]
    assert lineage["training"]["tokens"] == 30 * 4 * 2 * 64  # steps x batch x accumulation x world x block
    assert lineage["loss"]["teacher_weight"] == 0.5 and lineage["loss"]["distill_temperature"] == 1.0
    assert MatGPT2Config(**lineage["nested_config"]).mat_widths == GRANULARITIES
    assert lineage["package"]["name"] == "hf_matta"


def test_lineage_of_a_local_teacher_and_corpus(tmp_path):
    (tmp_path / "teacher").mkdir()
    model_args = types.SimpleNamespace(
        model_name_or_path=None, tokenizer_name_or_path=str(tmp_path / "tok"), teacher_pretrain_config="n_layer=4",
        teacher_pretrain_steps=120,
    )  # fmt: skip
    training_args = MatTATrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", teacher_model_name_or_path=str(tmp_path / "teacher")
    )
    config = MatGPT2Config(**tiny_kwargs(), mat_widths=GRANULARITIES)
    lineage = build_lineage(model_args, DataArguments(builtin_corpus="pydoc_data.topics"), training_args, config, 5)
    assert_no_secret_or_path(json.dumps(lineage), tmp_path)
    assert lineage["base_model"] is None and lineage["teacher"] == "local"
    assert lineage["teacher_pretraining"] == {"shape": "n_layer=4", "steps": 120}
    assert lineage["data"]["datasets"] == "local" and "pydoc_data.topics" in lineage["data"]["description"]


def test_lineage_and_card_record_the_ta_neurons_step(tmp_path):
    model_args = types.SimpleNamespace(model_name_or_path=None, tokenizer_name_or_path=None)
    config = MatGPT2Config(**tiny_kwargs(), mat_widths=GRANULARITIES)
    for scale, said in ((1.0, False), (2.0, True)):
        training_args = MatTATrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, report_to="none", ta_neuron_lr_scale=scale
        )
        data_args = DataArguments(builtin_corpus="pydoc_data.topics")
        lineage = build_lineage(model_args, data_args, training_args, config, 5)
        assert lineage["training"]["ta_neuron_lr_scale"] == scale
        card_row = _training_section(lineage)
        assert ("x 2.0 for the FFN neurons beyond the student's width" in card_row) == said, card_row


# --- publishing: what must be shown ------------------------------------------------------------------------------


def test_three_students_download_where_hf_matta_is_not_imported_with_equal_logits(hub, nested_dir, tmp_path, capsys):
    assert publish(nested_dir, "--collection", "tiny family") == 0
    output = capsys.readouterr()
    assert_no_secret_or_path(output.out + output.err, nested_dir)
    assert progress(output.out) == [("created", repo_id) for repo_id in REPOS.values()]
    for repo_id in REPOS.values():
        assert [commit.title for commit in hub.commits(repo_id)][-1] == "initial commit"
        assert len(hub.commits(repo_id)) == 2  # the repo's creation, then all files in one commit
        files = hub.files(repo_id)
        assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= set(
            files
        )
        assert_no_secret_or_path("\n".join(content.decode(errors="replace") for content in files.values()), nested_dir)
    assert {"modeling_matgpt2.py", "configuration_matgpt2.py"} <= set(hub.files(REPOS["mixed"]))
    assert "modeling_matgpt2.py" not in hub.files(REPOS["student"])  # uniform students are stock GPT-2
    (collection,) = hub.collections.values()
    assert [item["id"] for item in collection["items"]] == [REPOS["student"], REPOS["mixed"], REPOS["ta"]]

    input_ids = [[1, 5, 9, 13, 17, 21, 2, 3]]
    downloaded = client_process(
        hub,
        tmp_path,
        f"""
        import json, sys, torch
        from huggingface_hub import ModelCard
        from transformers import AutoModelForCausalLM
        out = {{}}
        for name, repo_id in {REPOS!r}.items():
            card = ModelCard.load(repo_id)
            card.validate()  # the Hub's own check of the metadata (POST /api/validate-yaml)
            mixed = "custom_code" in card.data.tags
            pinned = card.content.split('revision="')[1].split('"')[0] if mixed else None  # as the card says
            kwargs = dict(trust_remote_code=True, revision=pinned) if mixed else {{}}
            model = AutoModelForCausalLM.from_pretrained(repo_id, **kwargs)
            logits = model(torch.tensor({input_ids})).logits
            out[name] = dict(cls=type(model).__name__, logits=logits.tolist(), card=card.content)
        assert not any(module.startswith("hf_matta") for module in sys.modules), "hf_matta was imported"
        print(json.dumps(out))
        """,
    )
    assert downloaded.returncode == 0, downloaded.stderr[-3000:]
    loaded = json.loads(downloaded.stdout.strip().splitlines()[-1])
    nested = MatGPT2LMHeadModel.from_pretrained(nested_dir)
    for name, plan in PLANS.items():
        local = extract_student(nested, list(plan))(torch.tensor(input_ids)).logits
        torch.testing.assert_close(torch.tensor(loaded[name]["logits"]), local, rtol=0, atol=1e-5)
        card = ModelCard(loaded[name]["card"])
        assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
        assert card.data.base_model == "openai-community/gpt2" and card.data.base_model_relation == "finetune"
        assert {"matta", "matformer", "mix-n-match", "distillation"} <= set(card.data.tags)
        assert validate_card_metadata(card.content) == []
        assert format_plan(plan) in card.text
    assert loaded["student"]["cls"] == loaded["ta"]["cls"] == "GPT2LMHeadModel"
    assert loaded["mixed"]["cls"] == "MatGPT2LMHeadModel"
    assert "trust_remote_code" not in loaded["student"]["card"]
    tag = loaded["mixed"]["card"].split('revision="')[1].split('"')[0]
    assert hub.repos[REPOS["mixed"]].tags[tag] == hub.repos[REPOS["mixed"]].branches["main"]


def test_second_run_makes_no_commit(hub, nested_dir, tmp_path):
    assert publish(nested_dir, "--collection", "tiny family") == 0
    heads = {repo_id: hub.repos[repo_id].branches["main"] for repo_id in REPOS.values()}
    requests = len(hub.log)
    # The second run is a fresh `hf-matta publish` process configured by environment variables alone.
    again = client_process(
        hub,
        tmp_path,
        f"""
        import sys
        from hf_matta.cli import main
        argv = ["publish", {str(nested_dir)!r}, "--org", {ORG!r}, *{ARGV_PLANS!r}, "--collection", "tiny family"]
        sys.exit(main(argv))
        """,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert_no_secret_or_path(again.stdout + again.stderr, nested_dir)
    assert progress(again.stdout) == [("unchanged", repo_id) for repo_id in REPOS.values()]
    assert "3 students: 0 created, 0 updated, 3 unchanged" in again.stdout
    assert {repo_id: hub.repos[repo_id].branches["main"] for repo_id in REPOS.values()} == heads
    assert not any("/commit/" in path for _, path, _ in hub.log[requests:])
    (collection,) = hub.collections.values()
    assert len(collection["items"]) == 3  # nothing added twice


def test_run_whose_server_fails_after_the_first_repo_completes_on_rerun(nested_dir, monkeypatch, tmp_path, capsys):
    with HubServer(USERS) as reference:  # a run that goes through, to know where the first repo ends
        point_client_at(reference, monkeypatch, tmp_path)
        assert publish(nested_dir) == 0
        paths = [path for _, path, _ in reference.log]
        first_repo_requests = paths.index(f"/api/models/{REPOS['student']}/commit/main") + 1
        first_repo_requests -= paths.index("/api/whoami-v2")
        expected = {repo_id: files_at(reference, repo_id) for repo_id in REPOS.values()}
    capsys.readouterr()
    with HubServer(USERS) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        hub.fail_after(first_repo_requests)
        assert publish(nested_dir) == 1
        error = capsys.readouterr().err
        assert "500" in error and f"{REPOS['student']} (created)" in error and "run the same command again" in error
        assert TOKEN not in error
        assert list(hub.repos) == [REPOS["student"]] and len(hub.commits(REPOS["student"])) == 2
        hub.fail_after(None)
        assert publish(nested_dir) == 0
        out = capsys.readouterr().out
        assert "0 updated, 1 unchanged" in out and "2 created" in out
        for repo_id, files in expected.items():
            assert len(hub.commits(repo_id)) == 2  # nothing published twice
            assert files_at(hub, repo_id) == files  # nor lost: byte for byte what an uninterrupted run publishes
        assert hub.unknown == hub.crashes == []


def test_changed_card_is_one_commit_of_the_card_alone(hub, nested_dir, tmp_path):
    assert publish(nested_dir) == 0
    results = {
        "tasks": ["lambada_openai", "agieval_sat_math"],
        "lm_eval_version": "0.4.13",
        "students": [
            {
                "name": "ffn16",
                "source": "students/ffn16",
                "role": "student",
                "plan": list(PLANS["student"]),
                "parameters": 16096,
                "results": {
                    "lambada_openai": {
                        "acc": 0.125,
                        "acc_stderr": 0.01,
                        "perplexity": 812.5,
                        "perplexity_stderr": 40.0,
                    },
                    "agieval_sat_math": {"acc": 0.25, "acc_stderr": 0.03, "acc_norm": 0.2, "acc_norm_stderr": 0.03},
                },
            }
        ],
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    before = {repo_id: hub.repos[repo_id].branches["main"] for repo_id in REPOS.values()}
    assert publish(nested_dir, "--results", str(tmp_path / "results.json")) == 0
    student = hub.commits(REPOS["student"])
    assert len(student) == 3 and student[1].oid == before[REPOS["student"]]
    changed = {path for path, blob in student[0].tree.items() if student[1].tree.get(path) != blob}
    assert changed == {"README.md"}
    card = ModelCard(hub.files(REPOS["student"])["README.md"].decode())
    metrics = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert metrics == {
        ("EleutherAI/lambada_openai", "acc"): 0.125,
        ("EleutherAI/lambada_openai", "perplexity"): 812.5,
        ("dmayhem93/agieval-sat-math", "acc"): 0.25,
        ("dmayhem93/agieval-sat-math", "acc_norm"): 0.2,
    }
    card.validate()  # the test Hub's validate-yaml accepts the model-index
    assert "0.1250" in card.text and "0.0100" in card.text  # the value and its standard error, in the prose
    assert (
        hub.repos[REPOS["ta"]].branches["main"] == before[REPOS["ta"]]
    )  # no results for the TA: its card is the same


# --- errors: a clear message, a non-zero exit, nothing half-written, the token in no output ---------------------

ERRORS = {
    "no token": (["--org", ORG], {"HF_TOKEN": None}, 2, "no Hugging Face token: set HF_TOKEN or run `hf auth login`"),
    "rejected token": (["--org", ORG], {"HF_TOKEN": "hf_unknown_token_42"}, 1, "rejected the token from HF_TOKEN"),
    "read-only token": (["--org", ORG], {"HF_TOKEN": "hf_test_reader_read_only"}, 1, "is read-only"),
    "invalid namespace": (["--org", "bad--org"], {}, 2, "repo id 'bad--org/gpt2-matta-16.1K-ffn16' is not valid"),
    "namespace of another user": (["--org", "bob"], {}, 1, "cannot write to namespace 'bob'"),
    "invalid repo name": (["--org", ORG, "--name-template=-{plan}"], {}, 2, "repo id 'matta-org/-ffn16' is not"),
    "unknown name field": (["--org", ORG, "--name-template", "{size}"], {}, 2, "uses ['size']"),
    "names that collide": (["--org", ORG, "--name-template", "{base}"], {}, 2, "the same name 'gpt2'"),
    "server error": (["--org", ORG], {"fail": 0}, 1, "the Hub answered 500"),
    "unreachable Hub": (["--org", ORG], {"endpoint": "http://127.0.0.1:9"}, 1, "ConnectError"),
    "offline": (["--org", ORG], {"offline": True}, 2, "HF_HUB_OFFLINE is set"),
    "dry run without --out": (["--org", ORG, "--dry-run"], {}, 2, "--dry-run and --out go together"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_or_hub_failure_is_a_clear_error_before_any_upload(
    case, hub, nested_dir, monkeypatch, capsys, tmp_path
):
    argv, env, status, message = ERRORS[case]
    if "HF_TOKEN" in env:
        if env["HF_TOKEN"] is None:
            monkeypatch.delenv("HF_TOKEN")
        else:
            monkeypatch.setenv("HF_TOKEN", env["HF_TOKEN"])
    if "fail" in env:
        hub.fail_after(env["fail"])
    if "endpoint" in env:
        monkeypatch.setattr(constants, "ENDPOINT", env["endpoint"])
    if env.get("offline"):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where staging folders would be left
    try:
        code = main(["publish", str(nested_dir), *ARGV_PLANS, *argv])
    except SystemExit as exit:  # argparse's exit for bad input
        code = exit.code
    assert code == status
    output = capsys.readouterr()
    assert message in output.err
    assert_no_secret_or_path(output.out + output.err, nested_dir)
    assert env.get("HF_TOKEN") is None or env["HF_TOKEN"] not in output.out + output.err
    assert hub.repos == {}  # nothing uploaded
    assert list(tmp_path.iterdir()) == []  # nothing extracted, or left behind
    if status == 2:
        assert not any(path.startswith("/api/models") or path.startswith("/api/repos") for _, path, _ in hub.log)


def test_token_from_the_login_cache(hub, nested_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True)
    Path(constants.HF_TOKEN_PATH).write_text("hf_stale_cached_token")
    with pytest.raises(PublishError, match="rejected the token from the login cache") as error:
        publish_students(nested_dir, ORG, [PLANS["student"]], push=True, log=None)
    assert "hf_stale_cached_token" not in str(error.value)
    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)
    (published,) = publish_students(nested_dir, ORG, [PLANS["student"]], push=True, log=None)
    assert published.status == "created" and published.repo_id == REPOS["student"]


# --- dry run, student folders, branches ----------------------------------------------------------------------------


def test_dry_run_writes_exactly_the_uploaded_folders_without_token_or_network(hub, nested_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    assert publish(nested_dir, "--dry-run", "--out", str(tmp_path / "repos")) == 0
    assert hub.log == []  # no request at all
    assert sorted(path.name for path in (tmp_path / "repos").iterdir()) == sorted(
        r.split("/")[1] for r in REPOS.values()
    )
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert publish(nested_dir) == 0
    for repo_id in REPOS.values():
        folder = tmp_path / "repos" / repo_id.split("/")[1]
        written = {
            path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()
        }
        uploaded = hub.files(repo_id)
        uploaded.pop(".gitattributes")  # the Hub's own, made with the repo
        assert written == uploaded
        assert b"local_files_only" not in written["tokenizer_config.json"]  # nothing about this machine's loading
    # An existing folder is never overwritten unasked; --overwrite replaces it whole.
    with pytest.raises(SystemExit):
        publish(nested_dir, "--dry-run", "--out", str(tmp_path / "repos"))
    assert publish(nested_dir, "--plan", "32", "--dry-run", "--out", str(tmp_path / "repos"), "--overwrite") == 0
    assert len(list((tmp_path / "repos").iterdir())) == 4
    assert [path.name for path in tmp_path.iterdir()] == ["repos"]  # no temporary folder left


def test_student_folders_publish_the_same_repos_as_the_nested_model(nested_dir, tmp_path):
    plans = [arg for plan in PLANS.values() for arg in ("--plan", format_plan(plan))]
    assert main(["extract", str(nested_dir), *plans, "--out", str(tmp_path / "students")]) == 0
    for plan in PLANS.values():  # `hf-matta extract` students carry the nested model's lineage record
        assert read_lineage(tmp_path / "students" / plan_name(plan)) == read_lineage(nested_dir)
    publish_students(nested_dir, ORG, list(PLANS.values()), out_dir=tmp_path / "from_nested", log=None)
    publish_students(tmp_path / "students", ORG, out_dir=tmp_path / "from_students", log=None)

    def tree(root: Path) -> dict[str, bytes]:
        return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}

    assert tree(tmp_path / "from_students") == tree(tmp_path / "from_nested")
    with pytest.raises(ValueError, match="plans apply to a nested model folder only"):
        publish_students(tmp_path / "students", ORG, [PLANS["ta"]], out_dir=tmp_path / "x", log=None)
    (tmp_path / "students" / plan_name(PLANS["ta"]) / LINEAGE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="has no matta_lineage.json"):
        publish_students(tmp_path / "students", ORG, out_dir=tmp_path / "x", log=None)


def test_branch_and_private(hub, nested_dir, tmp_path):
    published = publish_students(
        nested_dir, ORG, [PLANS["student"]], push=True, revision="dev", private=True, log=None
    )
    repo = hub.repos[REPOS["student"]]
    assert repo.private and published[0].status == "created"
    assert len(hub.commits(REPOS["student"], "main")) == 1  # main keeps only the repo's creation
    assert len(hub.commits(REPOS["student"], "dev")) == 2
    assert 'revision="dev"' in hub.files(REPOS["student"], "dev")["README.md"].decode()
    again = publish_students(nested_dir, ORG, [PLANS["student"]], push=True, revision="dev", log=None)
    assert again[0].status == "unchanged"
    anonymous = client_process(
        hub, tmp_path, f"from huggingface_hub import model_info; model_info({REPOS['student']!r})", token=None
    )
    assert anonymous.returncode != 0 and "RepositoryNotFoundError" in anonymous.stderr
