"""The demo corpus and model: synthetic captioned scenes (:mod:`.scenes`), the script that trains the shipped ``demo``
preset on them (:mod:`.train`) and its quality measurements (:mod:`.quality`)."""
