"""segjax tests. A regular package (not a namespace one) so that `tests.*` imports resolve
here even when a dependency installs its own top-level `tests` package into site-packages
(mmsegmentation 1.2.2's wheel does).
"""
