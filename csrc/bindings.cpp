// Python bindings of the kvcached core (module kvcached._core).
//
// Ownership: the Python Region holds a shared_ptr to the C++ region; every DLPack tensor holds another
// through its manager_ctx. close() drops only the Python object's hold, so memory lives until the last
// tensor view is gone too. Every call that can block releases the GIL; the C++ side has its own mutex.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "dlpack.h"
#include "errors.h"
#include "region.h"

namespace py = pybind11;
using kvcached::Region;

namespace {

struct PyRegion {
  std::shared_ptr<Region> impl;

  // A copy, so a concurrent close() from another thread cannot free the region under a running call.
  std::shared_ptr<Region> get() const {
    std::shared_ptr<Region> r = impl;
    if (!r) throw std::invalid_argument("region is closed: create a new Region");
    return r;
  }
};

// One context per exported tensor, for either DLPack flavour; it owns the shape and a hold on the region.
struct DLPackContext {
  std::shared_ptr<Region> region;  // keeps the memory alive while the tensor lives
  int64_t shape[1];
  DLManagedTensor tensor;
  DLManagedTensorVersioned versioned;
};

// Called by the consumer (or by our capsule destructors) when the tensor dies; needs no GIL.
void dlpack_deleter(DLManagedTensor* t) { delete static_cast<DLPackContext*>(t->manager_ctx); }
void dlpack_versioned_deleter(DLManagedTensorVersioned* t) { delete static_cast<DLPackContext*>(t->manager_ctx); }

void dlpack_capsule_destructor(PyObject* capsule) {
  // A consumer renames the capsule "used_dltensor" and then owns the tensor; only unconsumed ones are ours.
  if (!PyCapsule_IsValid(capsule, "dltensor")) return;
  auto* t = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
  if (t && t->deleter) t->deleter(t);
}

void dlpack_versioned_capsule_destructor(PyObject* capsule) {
  if (!PyCapsule_IsValid(capsule, "dltensor_versioned")) return;
  auto* t = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(capsule, "dltensor_versioned"));
  if (t && t->deleter) t->deleter(t);
}

py::object make_dlpack(const std::shared_ptr<Region>& region, int64_t offset, std::optional<int64_t> nbytes,
                       bool versioned = false) {
  const int64_t size = static_cast<int64_t>(region->size());
  const int64_t n = nbytes.value_or(size - offset);
  if (offset < 0 || n < 0 || offset > size || n > size - offset) {
    throw std::out_of_range("dlpack view [" + std::to_string(offset) + ", +" + std::to_string(n) +
                            ") lies outside the region of " + std::to_string(size) + " bytes");
  }
  auto* ctx = new DLPackContext{region, {n}, {}, {}};
  DLTensor& t = versioned ? ctx->versioned.dl_tensor : ctx->tensor.dl_tensor;
  t.data = reinterpret_cast<void*>(region->address() + static_cast<uintptr_t>(offset));
  t.device = {region->dlpack_device_type(), region->dlpack_device_type() == kDLCUDA ? region->device() : 0};
  t.ndim = 1;
  t.dtype = {kDLInt, 8, 1};
  t.shape = ctx->shape;
  t.strides = nullptr;
  t.byte_offset = 0;
  PyObject* cap = nullptr;
  if (versioned) {
    ctx->versioned.version = {1, 0};
    ctx->versioned.manager_ctx = ctx;
    ctx->versioned.deleter = dlpack_versioned_deleter;
    ctx->versioned.flags = 0;  // writable, not a copy
    cap = PyCapsule_New(&ctx->versioned, "dltensor_versioned", dlpack_versioned_capsule_destructor);
  } else {
    ctx->tensor.manager_ctx = ctx;
    ctx->tensor.deleter = dlpack_deleter;
    cap = PyCapsule_New(&ctx->tensor, "dltensor", dlpack_capsule_destructor);
  }
  if (!cap) {
    delete ctx;
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(cap);
}

int64_t non_negative(int64_t v, const char* name) {
  if (v < 0) throw std::invalid_argument(std::string(name) + " must be non-negative, got " + std::to_string(v));
  return v;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "kvcached core: elastic memory regions (host and CUDA backends)";
  m.attr("ABI_VERSION") = 1;

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const kvcached::OutOfMemory& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    } catch (const kvcached::SystemError& e) {
      py::object args = py::make_tuple(e.err, e.what());
      PyErr_SetObject(PyExc_OSError, args.ptr());
    } catch (const kvcached::CudaError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const std::out_of_range& e) {
      PyErr_SetString(PyExc_IndexError, e.what());
    } catch (const std::logic_error& e) {
      // Only the cuda-only pool methods called on a host region throw a plain logic_error.
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });

  py::class_<PyRegion>(m, "Region", R"doc(
Reserved address space whose pages hold physical memory only while mapped.

Region(size, page_size, backend="host", device=0, path=None, prefault=False)

With ``path`` (a /dev/shm file) several processes share the committed-page state: one maps and unmaps,
the others call ``sync()`` to make their view match. backend="state" opens a cuda region's file with no
memory and no CUDA driver: map/unmap only record the decision, for a scheduler process.)doc")
      .def(py::init([](int64_t size, int64_t page_size, const std::string& backend, int device,
                       std::optional<std::string> path, bool prefault) {
             non_negative(size, "size");
             non_negative(page_size, "page_size");
             std::shared_ptr<Region> r;
             {
               py::gil_scoped_release nogil;
               r = Region::create(static_cast<size_t>(size), static_cast<size_t>(page_size), backend, device, path,
                                  prefault);
             }
             return std::make_unique<PyRegion>(PyRegion{std::move(r)});
           }),
           py::arg("size"), py::arg("page_size"), py::arg("backend") = "host", py::arg("device") = 0,
           py::arg("path") = py::none(), py::arg("prefault") = false)
      .def_property_readonly("size", [](const PyRegion& s) { return s.get()->size(); })
      .def_property_readonly("page_size", [](const PyRegion& s) { return s.get()->page_size(); })
      .def_property_readonly("num_pages", [](const PyRegion& s) { return s.get()->num_pages(); })
      .def_property_readonly("backend", [](const PyRegion& s) { return std::string(s.get()->backend_name()); })
      .def_property_readonly("device", [](const PyRegion& s) { return s.get()->device(); })
      .def_property_readonly("address", [](const PyRegion& s) { return s.get()->address(); })
      .def_property_readonly("path", [](const PyRegion& s) { return s.get()->path(); })
      .def_property_readonly("closed", [](const PyRegion& s) { return !s.impl; })
      .def_property_readonly("num_mapped", [](const PyRegion& s) { return s.get()->num_mapped(); })
      .def_property_readonly(
          "backing_bytes",
          [](const PyRegion& s) {
            auto r = s.get();
            py::gil_scoped_release nogil;
            return r->backing_bytes();
          },
          "Physical bytes held for data now, as the kernel (file block count) or driver accounts them.")
      .def(
          "map",
          [](const PyRegion& s, const std::vector<int64_t>& pages) {
            auto r = s.get();
            py::gil_scoped_release nogil;
            r->map(pages);
          },
          py::arg("pages"), "Commit physical memory for pages; all-or-nothing, MemoryError when none is left.")
      .def(
          "unmap",
          [](const PyRegion& s, const std::vector<int64_t>& pages) {
            auto r = s.get();
            py::gil_scoped_release nogil;
            r->unmap(pages);
          },
          py::arg("pages"), "Give pages' physical memory back to the OS/driver; unmapped pages are skipped.")
      .def(
          "is_mapped", [](const PyRegion& s, int64_t page) { return s.get()->is_mapped(page); }, py::arg("page"))
      .def(
          "sync",
          [](const PyRegion& s) {
            auto r = s.get();
            py::gil_scoped_release nogil;
            return r->sync();
          },
          "Apply the shared committed-page state to this process's view; returns pages changed.")
      .def(
          "resident_pages",
          [](const PyRegion& s) {
            auto r = s.get();
            py::gil_scoped_release nogil;
            return r->resident_pages();
          },
          "Pages holding physical memory (host: in the backing file, whoever committed them; cuda: here).")
      .def(
          "sweep",
          [](const PyRegion& s) {
            auto r = s.get();
            py::gil_scoped_release nogil;
            return r->sweep();
          },
          "Release pages that hold data but are not committed (stray accesses); returns pages reclaimed.")
      .def(
          "dlpack",
          [](const PyRegion& s, int64_t offset, std::optional<int64_t> nbytes) {
            return make_dlpack(s.get(), offset, nbytes);
          },
          py::arg("offset") = 0, py::arg("nbytes") = py::none(),
          "A 1-D int8 DLPack capsule over [offset, offset+nbytes); it keeps the region alive.")
      .def(
          "__dlpack__",
          [](const PyRegion& s, const py::object& stream, const py::object& max_version, const py::kwargs& kwargs) {
            // No work of ours is queued on any stream, so there is nothing to order against `stream`;
            // dl_device/copy requests need no action either: the region never copies.
            (void)stream;
            (void)kwargs;
            bool versioned = false;
            if (!max_version.is_none()) versioned = max_version.cast<py::tuple>()[0].cast<int>() >= 1;
            return make_dlpack(s.get(), 0, std::nullopt, versioned);
          },
          py::arg("stream") = py::none(), py::arg("max_version") = py::none(),
          "DLPack export of the whole region: versioned (1.0) when the consumer allows it, legacy otherwise.")
      .def("__dlpack_device__",
           [](const PyRegion& s) {
             auto r = s.get();
             const int type = r->dlpack_device_type();
             return py::make_tuple(type, type == kDLCUDA ? r->device() : 0);
           })
      .def_property_readonly("pool_size", [](const PyRegion& s) { return s.get()->pool_size(); })
      .def(
          "trim_pool",
          [](const PyRegion& s, int64_t keep) {
            auto r = s.get();
            const size_t k = static_cast<size_t>(non_negative(keep, "keep"));
            py::gil_scoped_release nogil;
            return r->trim_pool(k);
          },
          py::arg("keep") = 0, "Release pooled physical handles beyond `keep`; returns how many.")
      .def(
          "set_pool_limit",
          [](const PyRegion& s, int64_t n) {
            auto r = s.get();
            const size_t k = static_cast<size_t>(non_negative(n, "n"));
            py::gil_scoped_release nogil;
            r->set_pool_limit(k);
          },
          py::arg("n"))
      .def(
          "close",
          [](PyRegion& s) {
            std::shared_ptr<Region> r = std::move(s.impl);
            s.impl.reset();
            py::gil_scoped_release nogil;
            r.reset();  // may unmap and release device memory: no GIL needed, may block
          },
          "Drop this object's hold; memory goes when the last DLPack view is gone too.")
      .def("__enter__", [](PyRegion& s) -> PyRegion& { return s; }, py::return_value_policy::reference)
      .def("__exit__", [](PyRegion& s, const py::args&) {
        std::shared_ptr<Region> r = std::move(s.impl);
        s.impl.reset();
        py::gil_scoped_release nogil;
        r.reset();
      })
      .def("__repr__", [](const PyRegion& s) {
        if (!s.impl) return std::string("<kvcached._core.Region closed>");
        const auto& r = s.impl;
        return "<kvcached._core.Region backend=" + std::string(r->backend_name()) + " size=" +
               std::to_string(r->size()) + " page_size=" + std::to_string(r->page_size()) +
               " mapped=" + std::to_string(r->num_mapped()) + "/" + std::to_string(r->num_pages()) +
               (r->path() ? " path=" + *r->path() : std::string()) + ">";
      });

  m.def("cuda_available", &kvcached::cuda_available,
        "True when libcuda.so.1 loads and at least one device is visible (never raises).");
  m.def(
      "cuda_mem_info",
      [](int device) {
        py::gil_scoped_release nogil;
        return kvcached::cuda_mem_info(device);
      },
      py::arg("device") = 0, "(free, total) bytes of the device, from cuMemGetInfo.");
  m.def(
      "granularity",
      [](const std::string& backend, int device) -> size_t {
        if (backend == "host") return kvcached::host_granularity();
        if (backend == "cuda") {
          py::gil_scoped_release nogil;
          return kvcached::cuda_granularity(device);
        }
        throw std::invalid_argument("unknown backend '" + backend + "': use 'host' or 'cuda'");
      },
      py::arg("backend") = "host", py::arg("device") = 0,
      "Smallest page size the backend maps: the OS page size, or the CUDA allocation granularity.");
}
