// The per-step check of sf_torch's cached fused plan (sf_torch/fastpath.py), in C++ so that it
// costs nanoseconds per tensor instead of the ~1 us that reading .grad, .data_ptr() and the
// state from Python costs. It only reads: it compares what a group holds now with what the plan
// was built from, and collects the gradients' addresses. Anything that differs makes it answer
// STALE, and the caller rebuilds the plan through the general (Python) path, which also raises
// every error the optimizer promises (sparse gradients, layouts, devices, ...).

// Only the headers it needs (torch/extension.h would triple the build time).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>

#include <atomic>

#include <cstdint>
#include <cstring>
#include <vector>

namespace py = pybind11;

namespace {

// Tensors per task of the parallel pass (0: one thread); below it threads cost more than they
// save. A knob for measurements (set_grain).
int64_t g_grain = 256;

constexpr int kSame = 0;        // everything as built, gradients where they were last step
constexpr int kGradsMoved = 1;  // as built, but some gradient lives at a new address
constexpr int kStale = 2;       // something changed: rebuild through the general path

const at::Tensor& unpack(const py::object& obj) {
  if (!THPVariable_Check(obj.ptr())) throw std::invalid_argument("expected a tensor");
  return THPVariable_Unpack(obj.ptr());
}

struct Param {
  py::object obj;  // the param (a strong reference: identity is compared)
  const void* data;
  int64_t numel;
  c10::ScalarType dtype;
  c10::Device device;
  bool stepped;  // had a gradient when the plan was built (and so must have one now)
  size_t slot;   // its index among the stepped params
};

struct Buffer {  // z or v of a stepped param
  py::object obj;
  const void* data;
};

class Snapshot {
 public:
  // params: the group's params list; stepped: one bool per param; states: for each stepped
  // param, its state dict; checked: for each stepped param, whether check() must look into its
  // state dict (one whose changes the caller does not track otherwise); keys: the state keys the
  // step reads ("z", and "exp_avg_sq" for AdamW/RAdam).
  Snapshot(py::list params, std::vector<bool> stepped, py::list states, std::vector<bool> checked,
           std::vector<std::string> keys)
      : keys_(std::move(keys)), checked_(std::move(checked)) {
    for (const auto& key : keys_) key_objs_.push_back(py::str(key));
    if (params.size() != stepped.size()) throw std::invalid_argument("stepped: one bool per param");
    size_t j = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      py::object obj = params[i];
      if (!THPVariable_Check(obj.ptr())) throw std::invalid_argument("params must be tensors");
      const at::Tensor& p = THPVariable_Unpack(obj.ptr());
      params_.push_back(
          {obj, p.const_data_ptr(), p.numel(), p.scalar_type(), p.device(), stepped[i], j});
      if (!stepped[i]) continue;
      if (j >= states.size()) throw std::invalid_argument("states: one dict per stepped param");
      py::object st = states[j++];
      if (!PyDict_Check(st.ptr())) throw std::invalid_argument("states must be dicts");
      states_.push_back(st);
      for (const auto& key : keys_) {
        PyObject* t = PyDict_GetItemString(st.ptr(), key.c_str());  // borrowed
        if (t == nullptr || !THPVariable_Check(t)) throw std::invalid_argument("state lacks " + key);
        buffers_.push_back(
            {py::reinterpret_borrow<py::object>(t), THPVariable_Unpack(t).const_data_ptr()});
      }
      grads_.push_back(nullptr);
    }
    if (j != states.size() || checked_.size() != j)
      throw std::invalid_argument("states, checked: one per stepped param");
  }

  // Compares the group's params (and their grads and states) with the plan; changes nothing in
  // it. With ``with_grads``, writes the stepped params' gradient addresses into out[offset:], in
  // order, and answers kGradsMoved where one differs from those last remembered.
  //
  // Three passes: the list's items against the plan's params (pointer compares); the tensors,
  // split over torch's intra-op threads for large groups (each param costs a few dependent
  // memory reads, so threads hide their latency; only C++ tensor fields are read there, never
  // the Python API, and the caller holds the GIL throughout); then, on this thread, the state
  // dicts that the caller does not track.
  int check(py::list params, py::object out_obj, int64_t offset, bool with_grads) {
    const at::Tensor& out = unpack(out_obj);
    const size_t n = params_.size();
    if (static_cast<size_t>(params.size()) != n) return kStale;
    if (with_grads) {
      if (out.scalar_type() != at::kLong || !out.is_contiguous() || !out.device().is_cpu() ||
          out.numel() < offset + static_cast<int64_t>(grads_.size()))
        throw std::invalid_argument("out: a contiguous CPU int64 tensor large enough");
    }
    PyObject** items = PySequence_Fast_ITEMS(params.ptr());
    for (size_t i = 0; i < n; ++i)
      if (items[i] != params_[i].obj.ptr()) return kStale;

    int64_t* addr = with_grads ? out.data_ptr<int64_t>() + offset : nullptr;
    std::atomic<bool> stale{false};
    std::atomic<bool> moved{false};
    auto check_range = [&](int64_t begin, int64_t end) {
      bool range_moved = false;
      for (int64_t i = begin; i < end; ++i) {
        const Param& ref = params_[i];
        const at::Tensor& p = THPVariable_Unpack(items[i]);
        if (p.const_data_ptr() != ref.data || p.numel() != ref.numel ||
            p.scalar_type() != ref.dtype || p.device() != ref.device || !p.is_contiguous()) {
          stale = true;
          return;
        }
        if (!with_grads) continue;
        // TensorImpl's grad, not Tensor::grad(): that one asks the dispatcher whether p is a
        // leaf (for a warning), which costs more than all of this loop's other work.
        const at::Tensor& g = p.unsafeGetTensorImpl()->grad();
        if (g.defined() != ref.stepped) {
          stale = true;
          return;
        }
        if (!ref.stepped) continue;
        if (g.layout() != c10::kStrided || g.scalar_type() != ref.dtype ||
            g.device() != ref.device || g.numel() != ref.numel || !g.is_contiguous()) {
          stale = true;
          return;
        }
        const void* gp = g.const_data_ptr();
        range_moved |= gp != grads_[ref.slot];
        addr[ref.slot] = reinterpret_cast<int64_t>(gp);
      }
      if (range_moved) moved = true;
    };
    if (g_grain > 0 && static_cast<int64_t>(n) > 2 * g_grain) {
      at::parallel_for(0, static_cast<int64_t>(n), g_grain, check_range);
    } else {
      check_range(0, static_cast<int64_t>(n));
    }
    if (stale) return kStale;

    const size_t n_keys = key_objs_.size();
    for (size_t j = 0; j < states_.size(); ++j) {
      if (!checked_[j]) continue;
      PyObject* st = states_[j].ptr();
      for (size_t k = 0; k < n_keys; ++k) {
        const Buffer& ref = buffers_[j * n_keys + k];
        PyObject* t = PyDict_GetItem(st, key_objs_[k].ptr());  // borrowed; the key's hash is cached
        if (t != ref.obj.ptr()) return kStale;
        const at::Tensor& buf = THPVariable_Unpack(t);
        if (buf.const_data_ptr() != ref.data || !buf.is_contiguous()) return kStale;
      }
    }
    return moved ? kGradsMoved : kSame;
  }

  // Takes the addresses in out[offset:] as the ones the device table now holds: check() compares
  // the next step's gradients with them. Called once the table's upload has been queued, so a
  // step that fails between check() and the upload uploads again next time.
  void remember_grads(py::object out_obj, int64_t offset) {
    const at::Tensor& out = unpack(out_obj);
    if (out.scalar_type() != at::kLong || !out.is_contiguous() || !out.device().is_cpu() ||
        out.numel() < offset + static_cast<int64_t>(grads_.size()))
      throw std::invalid_argument("out: a contiguous CPU int64 tensor large enough");
    const int64_t* addr = out.data_ptr<int64_t>() + offset;
    for (size_t k = 0; k < grads_.size(); ++k) grads_[k] = reinterpret_cast<const void*>(addr[k]);
  }

 private:
  std::vector<std::string> keys_;
  std::vector<py::object> key_objs_;
  std::vector<bool> checked_;
  std::vector<Param> params_;
  std::vector<py::object> states_;
  std::vector<Buffer> buffers_;
  std::vector<const void*> grads_;
};

// The step's scalars as float64 bit patterns into out[0:len(values)] (out: CPU int64).
void put_scalars(py::object out_obj, const std::vector<double>& values) {
  const at::Tensor& out = unpack(out_obj);
  if (out.scalar_type() != at::kLong || !out.is_contiguous() || !out.device().is_cpu() ||
      out.numel() < static_cast<int64_t>(values.size()))
    throw std::invalid_argument("out: a contiguous CPU int64 tensor large enough");
  std::memcpy(out.data_ptr<int64_t>(), values.data(), values.size() * sizeof(double));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("SAME") = kSame;
  m.attr("GRADS_MOVED") = kGradsMoved;
  m.attr("STALE") = kStale;
  py::class_<Snapshot>(m, "Snapshot")
      .def(py::init<py::list, std::vector<bool>, py::list, std::vector<bool>,
                    std::vector<std::string>>())
      .def("check", &Snapshot::check)
      .def("remember_grads", &Snapshot::remember_grads);
  m.def("put_scalars", &put_scalars);
  m.def("set_grain", [](int64_t grain) { g_grain = grain; });
}
