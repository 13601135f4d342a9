"""segjax tests; a regular package so that another `tests` on sys.path (mmsegmentation ships one) cannot shadow it."""
