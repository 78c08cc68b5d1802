"""Triton's interpreter without its redundant re-patching of triton.language inside a launch.

Under TRITON_INTERPRET=1 a kernel launch patches the `triton.language` modules its globals name (their builtins
replaced by the interpreter's, restored when the launch ends), and then every call of a @triton.jit helper inside
the kernel patches them again: `inspect.getmembers` over the whole module, ~2.6 ms a call, finding nothing left to
patch since the modules are shared. The fused norms call helpers in every tile, so this was half the time of an
interpreted GroupNorm Unet step (30 of 56 s, cProfile). `skip_redundant_lang_patching` makes a helper's call skip the
patching when the launch running it has patched the same modules; anything else goes through Triton's own code.
What is computed does not change: the patched attributes are the same ones either way.
"""

import inspect


def skip_redundant_lang_patching():
    """Install the skip into triton.runtime.interpreter; returns False (and changes nothing) where that module
    lacks what it relies on (another Triton version)."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter

        original = interpreter._patch_lang
        empty_scope = interpreter._LangPatchScope
    except (ImportError, AttributeError):
        return False
    if getattr(original, "skips_redundant_patching", False):
        return True
    patched = set()  # ids of the language modules the running launch has patched
    modules_of = {}  # id of a function's globals: the ids of the language modules they name (fixed after import)

    def language_modules(fn):
        key = id(fn.__globals__)
        if key not in modules_of:
            modules_of[key] = frozenset(id(value) for value in fn.__globals__.values()
                                        if inspect.ismodule(value) and value in (tl, tl.core))
        return modules_of[key]

    def patch_lang(fn):
        modules = language_modules(fn)
        if patched and modules <= patched:
            return empty_scope()
        launch = not patched  # the kernel launch's own patching (helpers run only inside one)
        scope = original(fn)
        patched.update(modules)
        if launch:
            restore = scope.restore

            def restore_and_forget():
                patched.clear()
                restore()

            scope.restore = restore_and_forget
        return scope

    patch_lang.skips_redundant_patching = True
    interpreter._patch_lang = patch_lang
    return True
