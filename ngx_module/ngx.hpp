// The one place nginx's C headers are included. nginx's headers are C, so they go inside
// extern "C"; they also use C idioms C++ warns about, hence the pragmas.
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wunused-parameter"
extern "C" {
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_http.h>
}
#pragma GCC diagnostic pop

#include <string_view>

namespace ehrgate::ngx {

inline std::string_view view(const ngx_str_t &s) {
    return {reinterpret_cast<const char *>(s.data), s.len};
}

// Copies `text` into the pool; returns an empty ngx_str_t on allocation failure.
inline ngx_str_t pool_copy(ngx_pool_t *pool, std::string_view text) {
    ngx_str_t out{0, nullptr};
    if (text.empty()) {
        return out;
    }
    auto *data = static_cast<u_char *>(ngx_pnalloc(pool, text.size()));
    if (data != nullptr) {
        ngx_memcpy(data, text.data(), text.size());
        out.data = data;
        out.len = text.size();
    }
    return out;
}

}  // namespace ehrgate::ngx
