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

        original_patch = interpreter._patch_lang
        original_launch = interpreter.GridExecutor.__call__
        empty_scope = interpreter._LangPatchScope
    except (ImportError, AttributeError):
        return False
    if getattr(original_patch, "skips_redundant_patching", False):
        return True
    launches = []  # one entry per running launch: the ids of the language modules it has patched
    modules_of = {}  # id of a function's globals: the ids of the language modules they name (fixed after import)

    def language_modules(fn):
        key = id(fn.__globals__)
        if key not in modules_of:
            modules_of[key] = frozenset(id(value) for value in fn.__globals__.values()
                                        if inspect.ismodule(value) and value in (tl, tl.core))
        return modules_of[key]

    def patch_lang(fn):
        if not launches:  # outside a launch: Triton's own behaviour
            return patch_lang.original(fn)
        modules = language_modules(fn)
        if modules and modules <= launches[-1]:
            return empty_scope()
        scope = patch_lang.original(fn)
        launches[-1].update(modules)
        return scope

    def launch(self, *args, **kwargs):
        # Whatever this launch patched, it restores when it ends (Triton's code), and is forgotten here with it.
        launches.append(set())
        try:
            return original_launch(self, *args, **kwargs)
        finally:
            launches.pop()

    patch_lang.skips_redundant_patching = True
    patch_lang.original = original_patch  # Triton's own, called through this attribute (tests count its calls)
    interpreter._patch_lang = patch_lang
    interpreter.GridExecutor.__call__ = launch
    return True
