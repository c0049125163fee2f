// The SERE op schemas, declared once. Implementations: reroute_cpu.cpp, reroute_err_cpu.cpp and
// oea_cpu.cpp (CPU), reroute_cuda_glue.cpp and oea_cuda_glue.cpp (CUDA, built only against a CUDA
// torch); fake kernels: sere/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import sere._C` loads this shared library, whose static initialisers register the ops with
// the dispatcher; the module itself is empty (no pybind: the ops are reached via torch.ops.sere).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(sere, m) {
  // allowed [T, E] bool (node-aware routing, docs/spec.md §21): token t may only use the experts
  // with allowed[t, e]; its primary set is P & allowed[t]. None: every expert (plain policy).
  // new_ids: [T, K] like topk_ids; stats: [5] int64 in sere.reference.STAT_FIELDS order.
  m.def(
      "reroute(Tensor topk_ids, Tensor similarity, int num_primary, float threshold, "
      "Tensor? primary=None, Tensor? allowed=None) -> (Tensor new_ids, Tensor stats)");
  // Error-aware re-routing (sere.reference.sere_err_reference). new_ids [T, K] like topk_ids,
  // new_weights [T, K] like topk_weights, stats [6] int64 in sere.ops.ERR_STAT_FIELDS order
  // (STAT_FIELDS + dropped_slots). max_distinct <= 0: no budget; keep_cost may be inf.
  // router_scores [T, E]: refill the dropped slots from the loaded experts (before renormalize).
  m.def(
      "reroute_err(Tensor topk_ids, Tensor topk_weights, Tensor error, int num_primary, "
      "float tolerance, float keep_cost, int max_distinct, bool renormalize, Tensor? primary=None, "
      "Tensor? router_scores=None, Tensor? allowed=None) -> (Tensor new_ids, Tensor new_weights, Tensor stats)");
  // Opportunistic Expert Activation (sere.reference.oea_reference); E = router_scores.size(1).
  // new_ids [T, K] like topk_ids, new_weights [T, K] like topk_weights, stats [6] int64 in
  // sere.ops.ERR_STAT_FIELDS order (critical_slots 0, dropped_slots: slots left unfilled).
  m.def(
      "oea(Tensor topk_ids, Tensor topk_weights, Tensor router_scores, int num_primary, "
      "Tensor? primary=None, Tensor? allowed=None) -> (Tensor new_ids, Tensor new_weights, Tensor stats)");
  // [E] bool mask of P = {topk_ids[t, s] : s < num_primary}; OR it across an EP group.
  m.def("primary_mask(Tensor topk_ids, int num_experts, int num_primary) -> Tensor");
}
