#include "ehrgate/policy.hpp"
#include <gtest/gtest.h>
#include <iostream>
using namespace ehrgate::policy;
TEST(Dump, Files) {
  for (auto f : {"/conf/policy.yaml", "/conf/examples/invalid-policy.yaml", "/conf/examples/syntax-error.yaml"}) {
    auto r = load_bundle_file(std::string(EHRGATE_SOURCE_DIR) + f);
    std::cout << f << " bundle=" << r.bundle.has_value() << "\n";
    for (auto &d : r.diagnostics) std::cout << "  " << d.to_string() << "\n";
  }
}
