"""Which parameters synchronise together and when, against the rules of Streaming DiLoCo written
out here: blocks strided over the fragments, the embedding in the first, the head and the MTP modules
in the last; fragment p after the steps s = p*H/P (mod H), once every H steps."""

from __future__ import annotations

import pytest

from conftest import small_config
from moeforge.diloco.fragments import fragment_of, fragments_due, split_into_fragments
from moeforge.model.transformer import Transformer


@pytest.mark.parametrize("n_fragments", [1, 2, 3])
@pytest.mark.parametrize("tied", ["false", "true"])
def test_blocks_are_strided_and_every_parameter_is_in_one_fragment(n_fragments, tied):
    model = Transformer(small_config(model__mtp_depth="1", model__tie_embeddings=tied).model)
    fragments = split_into_fragments(model, n_fragments)
    owner = {name: frag.index for frag in fragments for name in frag.params}
    assert sum(len(frag.params) for frag in fragments) == len(owner)  # no parameter twice
    assert set(owner) == {name for name, _ in model.named_parameters()}
    for name, index in owner.items():
        if name.startswith("layers."):
            assert index == int(name.split(".")[1]) % n_fragments, name
        elif name.startswith("tok_embeddings."):
            assert index == 0
        else:
            assert name.split(".")[0] in ("norm", "output", "mtp") and index == n_fragments - 1, name
    assert ("output.weight" in owner) == (tied == "false")  # a tied head travels as the embedding
    biases = {name: frag.index for frag in fragments for name in frag.biases}
    assert biases and all(name.endswith("router.expert_bias") for name in biases)
    assert all(index == fragment_of(name, n_fragments) for name, index in biases.items())


def test_a_part_of_the_model_without_a_rule_is_an_error():
    with pytest.raises(ValueError, match="no fragment rule"):
        fragment_of("adapter.weight", 2)


@pytest.mark.parametrize("h, p", [(1, 1), (20, 1), (20, 2), (12, 3), (10, 4), (5, 5)])
def test_each_fragment_syncs_once_every_h_steps_at_its_offset(h, p):
    rounds = 3
    due = {fragment: [] for fragment in range(p)}
    for step in range(1, rounds * h + 1):
        for fragment in fragments_due(step, h, p):
            due[fragment].append(step)
    for fragment, steps in due.items():
        offset = fragment * h // p
        assert steps == [s for s in range(1, rounds * h + 1) if s % h == offset], fragment
        assert len(steps) == rounds
        assert all(b - a == h for a, b in zip(steps, steps[1:]))
    if p == h:  # one fragment after every step: the peak traffic is 1/P of the model
        assert all(len(fragments_due(step, h, p)) == 1 for step in range(1, rounds * h + 1))
