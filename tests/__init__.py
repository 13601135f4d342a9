"""segjax tests; a regular package so that another `tests` on sys.path (mmsegmentation's
wheel installs one) cannot shadow it."""
