"""build_optimizer: parameter groups, every backend, Shampoo's preconditioning and its weights_only resume, errors."""

import dataclasses
import subprocess
import sys
import types

import pytest
import torch

from hf_matta import MatGPT2Config, MatGPT2LMHeadModel
from hf_matta.models.matgpt2 import nested_ffn_parameters
from hf_matta.optim import build_optimizer, parameter_groups, preconditioned_blocks, scale_ta_neuron_steps
from hf_matta.training_args import MatTATrainingArguments

from .conftest import tiny_kwargs


DEFAULTS = {field.name: field.default for field in dataclasses.fields(MatTATrainingArguments)}
BACKENDS = ["adamw", "shampoo", "soap"]


def make_args(**overrides) -> types.SimpleNamespace:
    """The optimizer fields of MatTATrainingArguments, at their defaults unless overridden."""
    names = (
        "optimizer", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
        "max_preconditioner_dim", "precondition_frequency", "start_preconditioning_step", "shampoo_epsilon",
        "grafting", "align_blocks_to_widths",
    )  # fmt: skip
    return types.SimpleNamespace(**{**{name: DEFAULTS[name] for name in names}, "weight_decay": 0.1, **overrides})


def make_model(**overrides) -> MatGPT2LMHeadModel:
    return MatGPT2LMHeadModel(MatGPT2Config(**tiny_kwargs(**{"mat_widths": [32, 128], **overrides})))


def train(model, optimizer, input_ids, steps, width=None) -> list[float]:
    """`steps` optimizer steps of plain next-token loss at `width`; the losses before each step."""
    losses = []
    for _ in range(steps):
        loss = model(input_ids, labels=input_ids, ffn_widths=width).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_groups_decay_matrices_only_and_hold_each_parameter_once(tied):
    model = make_model(tie_word_embeddings=tied)
    model.transformer.wpe.weight.requires_grad_(False)
    groups = parameter_groups(model, weight_decay=0.1)
    grouped = [param for group in groups for param in group["params"]]
    trainable = [param for param in model.parameters() if param.requires_grad]
    assert len(grouped) == len({id(param) for param in grouped}) == len(trainable)
    assert {id(param) for param in grouped} == {id(param) for param in trainable}
    for group in groups:
        assert {param.dim() >= 2 for param in group["params"]} == {group["weight_decay"] == 0.1}
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_groups_and_steps_lower_the_loss(name, input_ids):
    model = make_model()
    optimizer = build_optimizer(model, make_args(optimizer=name, learning_rate=1e-2))
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(model.parameters()))
    losses = train(model, optimizer, input_ids, steps=6)
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("name", BACKENDS)
def test_ta_neuron_steps_are_scaled_and_nothing_else(name, input_ids):
    """Every backend, 12 steps (Shampoo preconditions from step 10): at each step, the update of the TA-only FFN
    slices is 2.5 times the one the same optimizer takes unscaled from the same weights and gradients, and every
    other parameter's update is the unscaled one."""
    scaled, plain = make_model(), make_model()
    plain.load_state_dict(scaled.state_dict())
    args = make_args(optimizer=name, learning_rate=1e-2)
    optimizers = {"scaled": build_optimizer(scaled, args), "plain": build_optimizer(plain, args)}
    scale_ta_neuron_steps(optimizers["scaled"], scaled, 2.5)
    nested = {**nested_ffn_parameters(0), **nested_ffn_parameters(1)}
    for _ in range(12):
        before = {key: p.detach().clone() for key, p in scaled.named_parameters()}
        for model, optimizer in ((scaled, optimizers["scaled"]), (plain, optimizers["plain"])):
            model(input_ids, labels=input_ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for key, p in scaled.named_parameters():
            expected = plain.get_parameter(key).detach() - before[key]
            if key in nested:
                expected.narrow(nested[key], 32, 96).mul_(2.5)
            torch.testing.assert_close(p.detach() - before[key], expected, atol=1e-6, rtol=1e-4)
        plain.load_state_dict(scaled.state_dict())  # the next step again from the same weights


def test_scaling_ta_neuron_steps_needs_a_ta():
    model = make_model(mat_widths=[128])
    with pytest.raises(ValueError, match="ta_neuron_lr_scale=2.0 needs a nested model whose FFN is wider than its"):
        scale_ta_neuron_steps(torch.optim.AdamW(model.parameters()), model, 2.0)


@pytest.mark.parametrize("grafting", ["adam", "sgd", "none"])
def test_shampoo_defaults_precondition_in_a_short_run(grafting, input_ids):
    # The library's defaults (start 25, every 1000 steps) would never compute a preconditioner in a short run.
    assert DEFAULTS["start_preconditioning_step"] <= 50 and DEFAULTS["precondition_frequency"] <= 50
    model = make_model()
    lr = 1e-1 if grafting == "sgd" else 1e-2
    optimizer = build_optimizer(model, make_args(optimizer="shampoo", grafting=grafting, learning_rate=lr))
    steps = DEFAULTS["start_preconditioning_step"]
    train(model, optimizer, input_ids, steps=steps - 1)
    assert list(preconditioned_blocks(optimizer)) == []
    losses = train(model, optimizer, input_ids, steps=3)
    # Every matrix has two preconditioners (rows and columns), all computed by now and finite.
    matrices = [param for param in model.parameters() if param.dim() == 2]
    computed = list(preconditioned_blocks(optimizer))
    assert len(computed) == 2 * len(matrices)
    assert all(torch.isfinite(matrix).all() for matrix in computed)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("max_dim, fc_shapes, wte_shapes", [
    (1024, [(32, 32), (128, 128)], [(99, 99), (32, 32)]),  # whole matrices
    (64, [(32, 32), (64, 64), (32, 32), (64, 64)], [(64, 64), (32, 32), (35, 35), (32, 32)]),  # blocked
])  # fmt: skip
def test_shampoo_preconditions_nested_ffn_and_tied_embedding_shapes(max_dim, fc_shapes, wte_shapes, input_ids):
    """The student-only gradient of a (32, 128) c_fc is zero beyond its 32 neurons: the rank-deficient statistics must
    still give finite preconditioners, and the TA's own neurons must stay untouched (no weight decay)."""
    model = make_model()
    args = make_args(optimizer="shampoo", learning_rate=1e-2, weight_decay=0.0, max_preconditioner_dim=max_dim)
    optimizer = build_optimizer(model, args)
    c_fc = model.transformer.h[0].mlp.c_fc.weight  # (32, 128): student neurons [:, :32]
    ta_neurons = c_fc[:, 32:].detach().clone()
    losses = train(model, optimizer, input_ids, steps=DEFAULTS["start_preconditioning_step"] + 2, width=32)
    fc_conditioner = optimizer.state[c_fc]["pre_conditioner"]
    wte_conditioner = optimizer.state[model.transformer.wte.weight]["pre_conditioner"]
    assert [tuple(m.shape) for m in fc_conditioner.pre_conditioners] == fc_shapes
    assert [tuple(m.shape) for m in wte_conditioner.pre_conditioners] == wte_shapes
    assert len(list(preconditioned_blocks(optimizer))) > 0
    assert all(torch.isfinite(param).all() for param in model.parameters())
    torch.testing.assert_close(c_fc[:, 32:], ta_neurons, rtol=0, atol=0)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("align, fc_splits, wte_splits", [
    (True, [(1, [48, 48, 32])], [(0, [64, 35])]),  # the student's 48 neurons are a block of their own
    (False, [(1, [64, 64])], [(0, [64, 35])]),  # block 0 mixes the student's 48 and 16 of the TA's
])  # fmt: skip
def test_shampoo_blocks_align_to_nested_widths(align, fc_splits, wte_splits, input_ids):
    model = make_model(mat_widths=[48, 128])
    args = make_args(optimizer="shampoo", max_preconditioner_dim=64, align_blocks_to_widths=align)
    optimizer = build_optimizer(model, args)
    train(model, optimizer, input_ids, steps=1)
    mlp = model.transformer.h[1].mlp
    assert optimizer.state[mlp.c_fc.weight]["pre_conditioner"].partitioner.split_sizes == fc_splits
    assert optimizer.state[mlp.c_proj.weight]["pre_conditioner"].partitioner.split_sizes == [(0, fc_splits[0][1])]
    assert optimizer.state[model.transformer.wte.weight]["pre_conditioner"].partitioner.split_sizes == wte_splits


@pytest.mark.parametrize("grafting, align", [("adam", True), ("sgd", False), ("none", False)])
def test_shampoo_resumes_from_a_weights_only_checkpoint(grafting, align, input_ids, tmp_path):
    """Trainer's resume: save the state, torch.load(weights_only=True) into a fresh optimizer, continue bit-exactly."""
    args = make_args(optimizer="shampoo", grafting=grafting, align_blocks_to_widths=align, max_preconditioner_dim=64)
    model = make_model(mat_widths=[48, 128])
    optimizer = build_optimizer(model, args)
    train(model, optimizer, input_ids, steps=DEFAULTS["start_preconditioning_step"] + 1)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    resumed_model = make_model(mat_widths=[48, 128])
    resumed_model.load_state_dict(model.state_dict())
    resumed = build_optimizer(resumed_model, args)
    resumed.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))

    steps = DEFAULTS["precondition_frequency"] + 1  # crosses a preconditioner update
    # ScalableShampoo's power iteration draws from the global RNG; Trainer restores it on resume, so do the same.
    torch.manual_seed(1)
    continued = train(model, optimizer, input_ids, steps)
    torch.manual_seed(1)
    assert train(resumed_model, resumed, input_ids, steps) == continued
    for param, resumed_param in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(resumed_param, param, rtol=0, atol=0)


def test_shampoo_checkpoint_needs_the_registered_classes(input_ids, tmp_path):
    """Without build_optimizer's registration a fresh process cannot load the state with weights_only=True."""
    model = make_model()
    optimizer = build_optimizer(model, make_args(optimizer="shampoo"))
    train(model, optimizer, input_ids, steps=1)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    code = (
        "import sys, torch\n"
        "try:\n"
        "    torch.load(sys.argv[1], weights_only=True)\n"
        "except Exception as error:\n"
        "    print('refused:', 'hf_matta.optim.AdamGraft' in str(error) or 'pytorch_optimizer' in str(error))\n"
    )
    command = [sys.executable, "-c", code, str(tmp_path / "optimizer.pt")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.stdout.strip() == "refused: True", result.stderr


@pytest.mark.parametrize("overrides, message", [
    (dict(optimizer="lion"), "optimizer='lion' is not one of ['adamw', 'shampoo', 'soap', 'distributed_shampoo']"),
    (dict(optimizer="shampoo", grafting="adagrad"), "grafting='adagrad' is not one of ['adam', 'sgd', 'none']"),
    (dict(optimizer="shampoo", start_preconditioning_step=5, precondition_frequency=20),
     "start_preconditioning_step=5 is below precondition_frequency=20"),
])  # fmt: skip
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(ValueError) as error:
        build_optimizer(make_model(), make_args(**overrides))
    assert message in str(error.value)


def test_aligning_blocks_needs_a_nested_model():
    with pytest.raises(ValueError, match="align_blocks_to_widths=True needs a nested model"):
        build_optimizer(torch.nn.Linear(4, 4), make_args(optimizer="shampoo", align_blocks_to_widths=True))


@pytest.mark.parametrize("name, module, install", [
    ("shampoo", "pytorch_optimizer", "pip install hf_matta[shampoo]"),
    ("soap", "heavyball", "pip install hf_matta[shampoo]"),
    ("distributed_shampoo", "distributed_shampoo", "pip install git+https://github.com/facebookresearch/optimizers"),
])  # fmt: skip
def test_missing_backend_says_what_to_install(name, module, install, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(ImportError) as error:
        build_optimizer(make_model(), make_args(optimizer=name))
    assert f"`{module}`" in str(error.value) and install in str(error.value)


def test_distributed_shampoo_gets_distributed_shampoos_names(monkeypatch):
    """The facebookresearch package is not on PyPI: a stand-in module records what build_optimizer passes."""
    fake = types.ModuleType("distributed_shampoo")

    class DistributedShampoo(torch.optim.SGD):
        def __init__(self, params, lr, **kwargs):
            super().__init__(params, lr=lr)
            self.kwargs = kwargs

    fake.DistributedShampoo = DistributedShampoo
    fake.AdamGraftingConfig = lambda **kwargs: ("adam", kwargs)
    monkeypatch.setitem(sys.modules, "distributed_shampoo", fake)
    args = make_args(optimizer="distributed_shampoo", max_preconditioner_dim=256, shampoo_epsilon=1e-10)
    optimizer = build_optimizer(make_model(), args)
    assert isinstance(optimizer, DistributedShampoo)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]
    assert optimizer.kwargs == dict(
        betas=(args.adam_beta1, args.adam_beta2),
        epsilon=1e-10,
        max_preconditioner_dim=256,
        precondition_frequency=args.precondition_frequency,
        start_preconditioning_step=args.start_preconditioning_step,
        use_decoupled_weight_decay=True,
        grafting_config=("adam", dict(beta2=args.adam_beta2, epsilon=args.adam_epsilon)),
    )
