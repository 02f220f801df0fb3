"""The gateway server: what ``python -m kuberun_trio`` runs.

The library (:mod:`kuberun_trio.gateway`) authenticates nobody and reads no files; this
package adds what an operator needs around it -- the YAML configuration
(:mod:`.config`, its sections in :mod:`.sshconfig`, :mod:`.authconfig`, :mod:`.opsconfig`),
host keys and the demo state directory (:mod:`.keys`, :mod:`.demo`),
authentication providers (``auth*``, with the fair password hashing queue
:mod:`.hashing`), structured logs (:mod:`.logs`), orphan clean-up
(:mod:`.gc`) and the main command with its signal handling (:mod:`.main`).
"""
