"""``python -m redcurrent._cli``: the ``redcurrent`` command without an installed script."""

from . import main

main()
