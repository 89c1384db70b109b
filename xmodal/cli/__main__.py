"""``python -m xmodal.cli ...`` (what ``accelerate launch -m xmodal.cli`` runs): the ``xmodal`` command."""
import sys

from . import main

sys.exit(main())
