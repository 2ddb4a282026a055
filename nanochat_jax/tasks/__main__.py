import sys

from nanochat_jax.tasks.hub import main

sys.exit(main())
