// Python bindings of lf._C. Each kernel takes its argument struct (common.h), bound here once: Python builds it
// by field name, tensors as data pointers (tensor.data_ptr()). lf/kernels validated dtype, device, shapes and
// layout before calling, so the kernels trust their arguments. The GIL is released while a kernel runs.
#include <string>
#include <type_traits>
#include <pybind11/native_enum.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include "dispatch.h"

namespace py = pybind11;

namespace {

// py::class_ for an argument struct: keyword construction (a field left out stays zero, a null pointer), fields
// read and written by name, pointer fields as integers.
template <class S> class Args : public py::class_<S> {
 public:
  Args(py::module_& m, const char* name) : py::class_<S>(m, name) {
    this->def(py::init([name](const py::kwargs& fields) {
      S s{};
      const py::object view = py::cast(&s, py::return_value_policy::reference);
      for (const auto& [field, value] : fields) {
        try {
          py::setattr(view, field, value);
        } catch (py::error_already_set& e) {  // say which struct and field the value was for
          const std::string message = std::string(name) + "." + py::str(field).cast<std::string>() + ": " +
                                      py::str(e.value()).cast<std::string>();
          py::raise_from(e, e.type().ptr(), message.c_str());
          throw py::error_already_set();
        }
      }
      return s;
    }));
  }

  template <class T> Args& field(const char* name, T S::*member) {
    if constexpr (std::is_pointer_v<T>) {
      this->def_property(
          name, [member](const S& s) { return reinterpret_cast<uintptr_t>(s.*member); },
          [member](S& s, uintptr_t address) { s.*member = reinterpret_cast<T>(address); });
    } else {
      this->def_readwrite(name, member);
    }
    return *this;
  }
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lf's CPU kernels (see lf.kernels for the public, validated API)";
  m.def("isa", [] { return std::string(lf::kernels().isa); }, "The instruction-set variant in use.");
  m.def("available_isas", &lf::available_isas, "Variants this CPU can run, best first.");
  m.def("set_isa", &lf::set_isa, py::arg("isa"), "Force a variant: generic, avx2, avx512 or avx512bf16.");

  py::native_enum<lf::DType>(m, "DType", "enum.Enum", "Storage type of a kernel's tensors, named as in torch.")
      .value("float32", lf::DType::float32)
      .value("bfloat16", lf::DType::bfloat16)
      .value("float16", lf::DType::float16)
      .finalize();
  py::native_enum<lf::Casting>(m, "Casting", "enum.Enum", "RMSNorm's numerics (lf.kernels.rms_norm's casting).")
      .value("llama", lf::Casting::llama)
      .value("gemma", lf::Casting::gemma)
      .value("none", lf::Casting::none)
      .finalize();
  py::native_enum<lf::GluKind>(m, "GluKind", "enum.Enum", "The activation of a gated MLP.")
      .value("swiglu", lf::GluKind::swiglu)
      .value("geglu_tanh", lf::GluKind::geglu_tanh)
      .value("geglu_erf", lf::GluKind::geglu_erf)
      .finalize();

  using namespace lf;
  // A field's Python name is its C++ name.
#define F(name) .field(#name, &S::name)
  { using S = RmsNormFwd; Args<S>(m, "RmsNormFwd") F(x) F(w) F(y) F(rstd) F(rows) F(cols) F(eps) F(offset)
      F(casting) F(dtype) F(threads); }
  { using S = RmsNormBwd; Args<S>(m, "RmsNormBwd") F(dy) F(x) F(w) F(rstd) F(dx) F(dw) F(rows) F(cols) F(offset)
      F(casting) F(dtype) F(threads); }
  { using S = RopeTensor; Args<S>(m, "RopeTensor") F(src) F(dst) F(heads) F(src_stride) F(dst_stride); }
  { using S = Rope; Args<S>(m, "Rope") F(q) F(k) F(cos) F(sin) F(cs_stride) F(batch) F(seq) F(dim) F(backward)
      F(dtype) F(threads); }
  { using S = GluFwd; Args<S>(m, "GluFwd") F(gate) F(up) F(out) F(n) F(kind) F(dtype) F(threads); }
  { using S = GluBwd; Args<S>(m, "GluBwd") F(dy) F(gate) F(up) F(dgate) F(dup) F(n) F(kind) F(dtype) F(threads); }
  { using S = CrossEntropy; Args<S>(m, "CrossEntropy") F(logits) F(grad) F(labels) F(loss) F(rows) F(vocab)
      F(ignore_index) F(smoothing) F(softcap) F(z_loss) F(grad_scale) F(dtype) F(threads); }
  { using S = Dequant4bit; Args<S>(m, "Dequant4bit") F(q) F(absmax) F(code) F(blocksize) F(nested) F(absmax2)
      F(code2) F(blocksize2) F(offset) F(in_features) F(row0) F(col0) F(rows) F(cols) F(out) F(weight_dtype)
      F(dtype) F(threads); }
  { using S = AttnBlock; Args<S>(m, "AttnBlock") F(s) F(lse) F(p) F(dp) F(o) F(dout) F(rows) F(n) F(dim) F(scale)
      F(grad) F(dtype) F(threads); }
  { using S = HeadsTensor; Args<S>(m, "HeadsTensor") F(data) F(stride); }
  { using S = FlashAttention; Args<S>(m, "FlashAttention") F(q) F(k) F(v) F(out) F(dout) F(dq) F(dk) F(dv) F(lse)
      F(segments) F(nseg) F(heads) F(kv_heads) F(seq) F(dim) F(scale) F(backward) F(dtype) F(threads); }
#undef F

  // Every kernel of common.h's list, called with its struct.
#define LF_BIND_KERNEL(name, A)                                                               \
  m.def(#name, [](const A& args) { kernels().name(args); }, py::arg("args"),                  \
        py::call_guard<py::gil_scoped_release>(), "Runs the kernel on " #A "'s pointers and sizes.");
  LF_KERNEL_LIST(LF_BIND_KERNEL)
#undef LF_BIND_KERNEL
}
