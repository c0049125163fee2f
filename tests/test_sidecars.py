import pytest
import torch

from sere.sidecars import SIDECAR_NAME, SidecarError, load_sidecar, save_sidecar


def _sim(num_experts, seed=0):
    sim = torch.rand(num_experts, num_experts, generator=torch.Generator().manual_seed(seed))
    sim.fill_diagonal_(1.0)
    return sim


def test_round_trip_through_a_model_directory(tmp_path):
    matrices = {0: _sim(8, 0), 1: _sim(8, 1)}
    path = save_sidecar(tmp_path, matrices, metric="cosine", num_tokens=1000, model_id="m", num_experts=8)
    assert path == tmp_path / SIDECAR_NAME
    sidecar = load_sidecar(tmp_path, num_experts=8, layer_ids=[0, 1])
    assert sidecar.metric == "cosine" and sidecar.num_tokens == 1000 and sidecar.model_id == "m"
    torch.testing.assert_close(sidecar.matrix(1), matrices[1])


def test_threshold_quantile_is_a_quantile_of_off_diagonal_values(tmp_path):
    sim = torch.full((4, 4), 0.5)
    sim[0, 1] = 0.1
    sim.fill_diagonal_(1.0)
    save_sidecar(tmp_path, {0: sim}, metric="cosine", num_tokens=1, model_id="m", num_experts=4)
    sidecar = load_sidecar(tmp_path)
    assert sidecar.threshold_for(0, 0.0) == pytest.approx(0.1)
    assert sidecar.threshold_for(0, 0.5) == pytest.approx(0.5)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(SidecarError, match=str(tmp_path / SIDECAR_NAME)):
        load_sidecar(tmp_path)


def test_missing_layer_names_file_and_layer(tmp_path):
    save_sidecar(tmp_path, {0: _sim(8)}, metric="cosine", num_tokens=1, model_id="m", num_experts=8)
    with pytest.raises(SidecarError, match=r"sere_similarity.safetensors: no similarity matrix for MoE layer 3"):
        load_sidecar(tmp_path, layer_ids=[0, 3])
    with pytest.raises(SidecarError, match="layer 5"):
        load_sidecar(tmp_path).matrix(5)


def test_mis_shaped_matrix_names_file_and_layer(tmp_path):
    from safetensors.torch import save_file

    save_file({"layers.0": _sim(8), "layers.2": torch.ones(8, 7)}, str(tmp_path / SIDECAR_NAME),
              metadata={"num_experts": "8"})
    with pytest.raises(SidecarError, match=r"layer 2 similarity has shape \(8, 7\), expected \[8, 8\]"):
        load_sidecar(tmp_path)


def test_sidecar_of_another_model_is_refused(tmp_path):
    save_sidecar(tmp_path, {0: _sim(8)}, metric="cosine", num_tokens=1, model_id="other", num_experts=8)
    with pytest.raises(SidecarError, match="8 experts, this model has 64"):
        load_sidecar(tmp_path, num_experts=64)


def test_corrupt_file_is_a_clear_error(tmp_path):
    (tmp_path / SIDECAR_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(SidecarError, match="not a readable safetensors file"):
        load_sidecar(tmp_path)


def test_substitution_error_sidecar_has_a_zero_diagonal(tmp_path):
    error = torch.rand(8, 8)
    error.fill_diagonal_(0.0)
    save_sidecar(tmp_path, {0: error}, metric="substitution_error", num_tokens=1, model_id="m", num_experts=8)
    assert load_sidecar(tmp_path).metric == "substitution_error"
    with pytest.raises(SidecarError, match="layer 0 cosine diagonal is not 1"):
        save_sidecar(tmp_path, {0: error}, metric="cosine", num_tokens=1, model_id="m", num_experts=8)
