// A CUDA device guard that does nothing, for fake CUDA tensors on a CPU-only torch build
// (cp_megatron/dryrun.py: ensure_fake_cuda_runtime).  Only c10 headers: it compiles in under
// a second, where torch/extension.h (load_inline's pybind module) took ~14 s.
#include <c10/core/impl/DeviceGuardImplInterface.h>
namespace {
// A CUDA device guard that does nothing: device 0, the default stream, events that are
// always complete.  Registered only on CPU-only builds, for fake CUDA tensors (dry run).
struct FakeCudaGuardImpl final : public c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return c10::DeviceType::CUDA; }
  c10::Device exchangeDevice(c10::Device) const override { return c10::Device(c10::DeviceType::CUDA, 0); }
  c10::Device getDevice() const override { return c10::Device(c10::DeviceType::CUDA, 0); }
  void setDevice(c10::Device) const override {}
  void uncheckedSetDevice(c10::Device) const noexcept override {}
  c10::Stream getStream(c10::Device) const noexcept override {
    return c10::Stream(c10::Stream::DEFAULT, c10::Device(c10::DeviceType::CUDA, 0)); }
  c10::Stream exchangeStream(c10::Stream) const noexcept override {
    return c10::Stream(c10::Stream::DEFAULT, c10::Device(c10::DeviceType::CUDA, 0)); }
  c10::DeviceIndex deviceCount() const noexcept override { return 1; }
  void record(void**, const c10::Stream&, const c10::DeviceIndex, const c10::EventFlag) const override {}
  void block(void*, const c10::Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  void destroyEvent(void*, const c10::DeviceIndex) const noexcept override {}
};
}
C10_REGISTER_GUARD_IMPL(CUDA, FakeCudaGuardImpl);
