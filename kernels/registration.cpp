// Every fastattn operator schema, declared once. Backends register kernels in
// kernels/cpu/<op>.cpp (CPU key), kernels/cuda/<op>.cu (CUDA key); Triton implementations
// are separate operators (fastattn::<op>_triton) defined from Python.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastattn, m) {
  // softmax(scale * x + mask) over the last dim. mask: bool (True = keep) or additive
  // (x's dtype or float32), broadcastable to x. causal: keep column j of row i (dim -2)
  // only when j <= i (top-left aligned, as torch's is_causal). Fully masked rows give 0.
  m.def("softmax(Tensor x, Tensor? mask, float scale, bool causal) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // grad_x = scale * out * (grad_out - sum(grad_out * out, -1))
  m.def("softmax_backward(Tensor grad_out, Tensor out, float scale) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

// `import fastattn._C` loads this library (and so runs the registrations above).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
