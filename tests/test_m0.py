def test_probe(client):
    import threading

    import daskdl.engine as e

    def probe():
        return e._malloc_users, [t.name for t in threading.enumerate()]

    print("\nPROBE", client.run(probe), client.processing())
