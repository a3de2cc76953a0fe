"""llama-cpp-python without its extra CPU buffer types (AMX / repacked weights): their from-source
build crashes in the AMX repack path on the machine the reference figures come from. `Llama()` takes
its model parameters from `llama_model_default_params()` and has no argument for `use_extra_bufts`,
so the default is patched there. Call before creating a `Llama`."""
import llama_cpp.llama_cpp as _lib


def disable_extra_bufts():
    default = _lib.llama_model_default_params
    if getattr(default, "_infer_patched", False):
        return

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    params._infer_patched = True
    _lib.llama_model_default_params = params
