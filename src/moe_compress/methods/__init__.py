"""Compression methods (`base`: the interface and the registry; `pruning/`, `merging/`, `hybrid/`: one module
per method).

Importing this package (which Python does before any of its modules) imports every module that registers a
method, so the registry lookups of `methods.base` (`get_method`, `method_class`, `all_methods`) always see all
of them. The list is explicit and static: the method modules import `methods.base`, which imports none of them,
so registration is no import cycle. tests/test_layering.py fails when a module of `pruning/`, `merging/` or
`hybrid/` defines a registered method and is missing here.
"""

import moe_compress.methods.hybrid.refit  # noqa: F401
import moe_compress.methods.merging.hcsmoe  # noqa: F401
import moe_compress.methods.merging.msmoe  # noqa: F401
import moe_compress.methods.merging.submoe  # noqa: F401
import moe_compress.methods.pruning.dern  # noqa: F401
import moe_compress.methods.pruning.ean  # noqa: F401
import moe_compress.methods.pruning.easy_ep  # noqa: F401
import moe_compress.methods.pruning.heapr  # noqa: F401
import moe_compress.methods.pruning.mone  # noqa: F401
import moe_compress.methods.pruning.naee  # noqa: F401
import moe_compress.methods.pruning.premoe  # noqa: F401
import moe_compress.methods.pruning.reap  # noqa: F401
import moe_compress.methods.pruning.simple  # noqa: F401
import moe_compress.methods.pruning.stun  # noqa: F401
