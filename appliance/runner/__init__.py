"""Each loaded model runs in a runner process.

``supervisor`` is the service's side (start, stream, restart), ``protocol`` the messages on the pipe,
``worker`` the process itself, ``scheduler`` its step loop and ``prompt`` how a request becomes tokens.
"""
