"""CUDA source -> C++ for the cudasim executor.

The output is the input text with a few mechanical rewrites, every line kept on its line and a
`#line` directive naming the original file, so compiler messages, sanitizer reports and the
executor's own diagnostics point at the project's .cu source:

  k<T><<<grid, block, smem, stream>>>(args)  ->  ::cudasim::launch(info, k<T>, config(...), args)
  __shared__ T name[A][B];                   ->  auto& name = ::cudasim::static_shared<T[A][B]>(site);
  extern __shared__ T name[];                ->  T* name = ::cudasim::dynamic_shared<T>();
  TORCH_LIBRARY_IMPL(dsig, CUDA, m)          ->  TORCH_LIBRARY_IMPL(dsig, PrivateUse1, m)
  x.is_cuda()                                ->  x.is_privateuseone()

Host .cpp files of the op library are compiled again beside them; their schema definitions and
non-CUDA registrations move to a shadow namespace (the real extension owns `dsig`). Anything the
translator does not understand is an error, never a silent pass-through.
"""
import os
import re
import sys

SHADOW = "cudasim_shadow_dsig"

PRELUDE = """\
#include <cudasim/prelude.h>
#define __CUDACC__ 1
#define __CUDA_ARCH__ 900
#define fma(a, b, c) ::cudasim::fma_(a, b, c)
"""


class TranslationError(RuntimeError):
    pass


def _line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def _registrations(text, cuda):
    """TORCH_LIBRARY* of namespace dsig: CUDA kernels onto the simulated device, the rest away."""
    text = re.sub(r"\bTORCH_LIBRARY_FRAGMENT\(\s*dsig\s*,", f"TORCH_LIBRARY_FRAGMENT({SHADOW},",
                  text)
    text = re.sub(r"\bTORCH_LIBRARY\(\s*dsig\s*,", f"TORCH_LIBRARY({SHADOW},", text)

    def impl(m):
        ns, key = m.group(1), m.group(2)
        if key == "CUDA":
            return f"TORCH_LIBRARY_IMPL({ns}, PrivateUse1,"
        return f"TORCH_LIBRARY_IMPL({SHADOW if ns == 'dsig' else ns}, {key},"

    text = re.sub(r"\bTORCH_LIBRARY_IMPL\(\s*(\w+)\s*,\s*(\w+)\s*,", impl, text)
    if cuda:
        text = re.sub(r"\.is_cuda\(\)", ".is_privateuseone()", text)
        text = re.sub(r"\b(at|c10|torch)::kCUDA\b", r"\1::kPrivateUse1", text)
        text = re.sub(r"\bDeviceType::CUDA\b", "DeviceType::PrivateUse1", text)
    return text


def _launch_bounds(text):
    """Kernel name -> its __launch_bounds__ max-threads expression (or '0')."""
    bounds = {}
    for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\(([^)]*)\)\s+)?(\w+)\s*\(",
                         text):
        bounds[m.group(2)] = m.group(1).split(",")[0].strip() if m.group(1) else "0"
    return bounds


def _kernel_expression_start(text, end):
    """Start of `name` or `ns::name<targs>` ending just before `end`."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if i > 0 and text[i - 1] == ">":
        depth = 0
        while i > 0:
            i -= 1
            if text[i] == ">":
                depth += 1
            elif text[i] == "<":
                depth -= 1
                if depth == 0:
                    break
        if depth != 0:
            raise TranslationError("unbalanced template arguments before <<<")
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def _launches(text, bounds, path):
    out, pos = [], 0
    while True:
        start = text.find("<<<", pos)
        if start < 0:
            out.append(text[pos:])
            return "".join(out)
        stop = text.find(">>>", start)
        if stop < 0:
            raise TranslationError(f"{path}:{_line_of(text, start)}: <<< without >>>")
        expr_start = _kernel_expression_start(text, start)
        if expr_start < pos:
            raise TranslationError(f"{path}:{_line_of(text, start)}: kernel expression not found")
        expr = text[expr_start:start].strip()
        name = re.match(r"[\w:]*?(\w+)\s*(<|$)", expr).group(1)
        if name not in bounds:
            raise TranslationError(f"{path}:{_line_of(text, start)}: launch of {name}, which is "
                                   "not a __global__ function of this file")
        after = stop + 3
        m = re.compile(r"\s*\(").match(text, after)
        if not m:
            raise TranslationError(f"{path}:{_line_of(text, stop)}: >>> not followed by (")
        args_open = m.end()
        empty_args = re.compile(r"\s*\)").match(text, args_open) is not None
        config = text[start + 3:stop]
        out.append(text[pos:expr_start])
        # the kernel expression keeps its own text (and line breaks)
        out.append(f'::cudasim::launch(::cudasim::KernelInfo{{"{name}", {bounds[name]}, '
                   f"__FILE__, __LINE__}}, {text[expr_start:start]}, ::cudasim::config({config})"
                   + ("" if empty_args else ", "))
        pos = args_open


_SHARED = re.compile(
    r"(extern\s+)?__shared__\s+(?:__align__\(\s*(\d+)\s*\)\s+)?([^;{}()]*?)\s*\b(\w+)\s*"
    r"((?:\[[^\]]*\])*)\s*;")


def _shared(text, path, site_base):
    counter = [site_base]

    def rewrite(m):
        ext, align, typ, name, dims = (m.group(1), m.group(2), m.group(3).strip(), m.group(4),
                                       m.group(5))
        if align and (int(align) & (int(align) - 1) or int(align) > (16 if ext else 256)):
            # dynamic shared memory is 16-byte aligned, static allocations as asked
            raise TranslationError(f"{path}:{_line_of(text, m.start())}: __align__({align}) "
                                   "is not supported here")
        if re.search(r"\bstatic\s*$", text[max(0, m.start() - 20):m.start()]):
            raise TranslationError(f"{path}:{_line_of(text, m.start())}: static __shared__")
        if "\n" in m.group(0):
            raise TranslationError(f"{path}:{_line_of(text, m.start())}: a __shared__ "
                                   "declaration over several lines")
        if ext:
            if dims.replace(" ", "") != "[]":
                raise TranslationError(f"{path}:{_line_of(text, m.start())}: extern __shared__ "
                                       "must be an unsized array")
            return f"{typ}* {name} = ::cudasim::dynamic_shared<{typ}>();"
        counter[0] += 1
        aligned = f", {align}" if align else ""
        return f"auto& {name} = ::cudasim::static_shared<{typ}{dims}{aligned}>({counter[0]});"

    text = _SHARED.sub(rewrite, text)
    left = re.search(r"__shared__", text)
    if left:
        raise TranslationError(f"{path}:{_line_of(text, left.start())}: a __shared__ "
                               "declaration the translator does not understand")
    return text


def translate(text, path, cuda=True, site_base=0):
    """Translated C++ text of one source file (`path` as it should appear in diagnostics)."""
    n_lines = text.count("\n")
    text = _registrations(text, cuda)
    if cuda:
        text = _launches(text, _launch_bounds(text), path)
        text = _shared(text, path, site_base)
        head = PRELUDE
    else:
        head = ""
    if text.count("\n") != n_lines:
        raise TranslationError(f"{path}: translation changed the line count")
    return f'{head}#line 1 "{path}"\n{text}'


def main(argv):
    src, dst, shown = argv[1], argv[2], argv[3]
    with open(src) as f:
        text = f.read()
    out = translate(text, shown, cuda=src.endswith(".cu"))
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    with open(dst, "w") as f:
        f.write(out)


if __name__ == "__main__":
    main(sys.argv)
