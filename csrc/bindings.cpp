// Python bindings of lf._C. Tensors arrive as data pointers, sizes and strides; lf/kernels validated
// dtype, device, shapes and layout before calling, so these functions trust their arguments.
// The GIL is released while a kernel runs.
#include <array>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include "dispatch.h"

namespace py = pybind11;
using lf::DType;

namespace {

template <class T> inline T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

template <class Args> void call(void (*fn)(const Args&), const Args& args) {
  py::gil_scoped_release release;
  fn(args);
}

lf::RopeTensor rope_tensor(uintptr_t in, uintptr_t out, int64_t heads, std::array<int64_t, 3> in_stride,
                           std::array<int64_t, 3> out_stride) {
  lf::RopeTensor t{ptr<const void>(in), ptr<void>(out), heads, {}, {}};
  for (int i = 0; i < 3; ++i) { t.in_stride[i] = in_stride[i]; t.out_stride[i] = out_stride[i]; }
  return t;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lf's CPU kernels (see lf.kernels for the public, validated API)";
  m.def("isa", [] { return std::string(lf::kernels().isa); }, "The instruction-set variant in use.");
  m.def("available_isas", &lf::available_isas, "Variants this CPU can run, best first.");
  m.def("set_isa", &lf::set_isa, py::arg("isa"), "Force a variant: generic, avx2 or avx512.");

  m.def("rms_norm_fwd",
        [](uintptr_t x, uintptr_t w, uintptr_t y, uintptr_t rstd, int64_t rows, int64_t cols, float eps,
           float offset, int casting, int dtype, int threads) {
          call(lf::kernels().rms_norm_fwd,
               lf::RmsNormFwd{ptr<const void>(x), ptr<const void>(w), ptr<void>(y), ptr<float>(rstd), rows, cols,
                              eps, offset, casting, DType(dtype), threads});
        },
        py::arg("x"), py::arg("w"), py::arg("y"), py::arg("rstd"), py::arg("rows"), py::arg("cols"),
        py::arg("eps"), py::arg("offset"), py::arg("casting"), py::arg("dtype"), py::arg("threads"));

  m.def("rms_norm_bwd",
        [](uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t rstd, uintptr_t dx, uintptr_t dw, int64_t rows,
           int64_t cols, float offset, int casting, int dtype, int threads) {
          call(lf::kernels().rms_norm_bwd,
               lf::RmsNormBwd{ptr<const void>(dy), ptr<const void>(x), ptr<const void>(w), ptr<const float>(rstd),
                              ptr<void>(dx), ptr<void>(dw), rows, cols, offset, casting, DType(dtype), threads});
        },
        py::arg("dy"), py::arg("x"), py::arg("w"), py::arg("rstd"), py::arg("dx"), py::arg("dw"), py::arg("rows"),
        py::arg("cols"), py::arg("offset"), py::arg("casting"), py::arg("dtype"), py::arg("threads"));

  m.def("rope",
        [](uintptr_t q, uintptr_t q_out, int64_t q_heads, std::array<int64_t, 3> q_stride,
           std::array<int64_t, 3> q_out_stride, uintptr_t k, uintptr_t k_out, int64_t k_heads,
           std::array<int64_t, 3> k_stride, std::array<int64_t, 3> k_out_stride, uintptr_t cos, uintptr_t sin,
           std::array<int64_t, 2> cs_stride, int64_t batch, int64_t seq, int64_t dim, bool backward, int dtype,
           int threads) {
          lf::Rope a{rope_tensor(q, q_out, q_heads, q_stride, q_out_stride),
                     rope_tensor(k, k_out, k_heads, k_stride, k_out_stride),
                     ptr<const void>(cos), ptr<const void>(sin), {cs_stride[0], cs_stride[1]},
                     batch, seq, dim, backward, DType(dtype), threads};
          call(lf::kernels().rope, a);
        },
        py::arg("q"), py::arg("q_out"), py::arg("q_heads"), py::arg("q_stride"), py::arg("q_out_stride"),
        py::arg("k"), py::arg("k_out"), py::arg("k_heads"), py::arg("k_stride"), py::arg("k_out_stride"),
        py::arg("cos"), py::arg("sin"), py::arg("cs_stride"), py::arg("batch"), py::arg("seq"), py::arg("dim"),
        py::arg("backward"), py::arg("dtype"), py::arg("threads"));

  m.def("glu_fwd",
        [](uintptr_t gate, uintptr_t up, uintptr_t out, int64_t n, int kind, int dtype, int threads) {
          call(lf::kernels().glu_fwd,
               lf::GluFwd{ptr<const void>(gate), ptr<const void>(up), ptr<void>(out), n, kind, DType(dtype), threads});
        },
        py::arg("gate"), py::arg("up"), py::arg("out"), py::arg("n"), py::arg("kind"), py::arg("dtype"),
        py::arg("threads"));

  m.def("glu_bwd",
        [](uintptr_t dy, uintptr_t gate, uintptr_t up, uintptr_t dgate, uintptr_t dup, int64_t n, int kind,
           int dtype, int threads) {
          call(lf::kernels().glu_bwd,
               lf::GluBwd{ptr<const void>(dy), ptr<const void>(gate), ptr<const void>(up), ptr<void>(dgate),
                          ptr<void>(dup), n, kind, DType(dtype), threads});
        },
        py::arg("dy"), py::arg("gate"), py::arg("up"), py::arg("dgate"), py::arg("dup"), py::arg("n"),
        py::arg("kind"), py::arg("dtype"), py::arg("threads"));

  m.def("cross_entropy",
        [](uintptr_t logits, uintptr_t grad, uintptr_t labels, uintptr_t loss, int64_t rows, int64_t vocab,
           int64_t ignore_index, float smoothing, float softcap, float z_loss, float grad_scale, int dtype,
           int threads) {
          call(lf::kernels().cross_entropy,
               lf::CrossEntropy{ptr<const void>(logits), ptr<void>(grad), ptr<const int64_t>(labels), ptr<float>(loss),
                                rows, vocab, ignore_index, smoothing, softcap, z_loss, grad_scale, DType(dtype),
                                threads});
        },
        py::arg("logits"), py::arg("grad"), py::arg("labels"), py::arg("loss"), py::arg("rows"), py::arg("vocab"),
        py::arg("ignore_index"), py::arg("smoothing"), py::arg("softcap"), py::arg("z_loss"), py::arg("grad_scale"),
        py::arg("dtype"), py::arg("threads"));

  m.def("dequant_4bit",
        [](uintptr_t q, uintptr_t absmax, uintptr_t code, int64_t blocksize, bool nested, uintptr_t absmax2,
           uintptr_t code2, int64_t blocksize2, float offset, int64_t in_features, int64_t row0, int64_t col0,
           int64_t rows, int64_t cols, uintptr_t out, int weight_dtype, int dtype, int threads) {
          call(lf::kernels().dequant_4bit,
               lf::Dequant4bit{ptr<const uint8_t>(q), ptr<const void>(absmax), ptr<const float>(code), blocksize,
                               nested, ptr<const float>(absmax2), ptr<const float>(code2), blocksize2, offset,
                               in_features, row0, col0, rows, cols, ptr<void>(out), DType(weight_dtype),
                               DType(dtype), threads});
        },
        py::arg("q"), py::arg("absmax"), py::arg("code"), py::arg("blocksize"), py::arg("nested"), py::arg("absmax2"),
        py::arg("code2"), py::arg("blocksize2"), py::arg("offset"), py::arg("in_features"), py::arg("row0"),
        py::arg("col0"), py::arg("rows"), py::arg("cols"), py::arg("out"), py::arg("weight_dtype"), py::arg("dtype"),
        py::arg("threads"));

  m.def("attn_block",
        [](uintptr_t s, uintptr_t lse, uintptr_t p, uintptr_t dp, uintptr_t o, uintptr_t dout, int64_t rows,
           int64_t n, int64_t dim, float scale, bool grad, int dtype, int threads) {
          call(lf::kernels().attn_block,
               lf::AttnBlock{ptr<const void>(s), ptr<const float>(lse), ptr<void>(p), ptr<void>(dp),
                             ptr<const void>(o), ptr<const void>(dout), rows, n, dim, scale, grad, DType(dtype),
                             threads});
        },
        py::arg("s"), py::arg("lse"), py::arg("p"), py::arg("dp"), py::arg("o"), py::arg("dout"), py::arg("rows"),
        py::arg("n"), py::arg("dim"), py::arg("scale"), py::arg("grad"), py::arg("dtype"), py::arg("threads"));
}
