// Declaration stand-in for the gloo headers that torch's ProcessGroupGloo.hpp includes. The
// PyPI wheel links gloo into libtorch_cpu but ships none of its headers. The c10d header only
// names these types through pointers and overrides four virtuals of the rendezvous store, so
// declarations are enough to construct a ProcessGroupGloo and call it through c10d::Backend.
// Never define a gloo object from these: the real layouts live in libtorch_cpu.
#pragma once
#include <chrono>
#include <string>
#include <vector>

namespace gloo {
class Context {
 public:
  // Defined in libtorch_cpu (ProcessGroupGloo::setTimeout, inline in the header, calls it).
  void setTimeout(std::chrono::milliseconds timeout);
};
namespace transport {
class Device;
class UnboundBuffer;
}  // namespace transport
namespace rendezvous {
class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) = 0;
};
}  // namespace rendezvous
}  // namespace gloo
