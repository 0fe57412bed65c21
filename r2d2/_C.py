"""Stand-in for the compiled extension, for installs that have none built ahead of time.

Python imports a built ``r2d2/_C<suffix>.so`` before a ``_C.py`` in the same folder, so this file
runs only where no extension was built at install time (``pip install .`` with build isolation,
``R2D2_SKIP_EXT=1``). It puts the first-use build of :mod:`r2d2._jit` (cached per torch
version, compiled now if needed, with a message) in its place, so ``import r2d2._C`` works the same
in every install; an ImportError with one line says why when there is none (``R2D2_NO_JIT=1``, no
compiler, ...).
"""

import sys

from r2d2 import _jit

sys.modules[__name__] = _jit.load()
