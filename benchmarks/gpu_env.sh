# Sourced by the GPU run scripts: puts the repository on PYTHONPATH and installs, from .whl/, the
# wheels of packages the GPU image lacks (hydra, omegaconf, simpy, ...), skipping those it has.
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  need=""
  for w in .whl/*; do
    mod=$(basename "$w" | sed -E 's/^(hydra_core|hydra-core).*/hydra/; s/^omegaconf.*/omegaconf/; s/^simpy.*/simpy/;
      s/^antlr4.*/antlr4/; s/^pyarrow.*/pyarrow/; s/^hydra_joblib_launcher.*/hydra_plugins.hydra_joblib_launcher/')
    python3 -c "import $mod" 2>/dev/null || need="$need $w"
  done
  [ -n "$need" ] && python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site $need
fi
