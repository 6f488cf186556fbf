@a.b(c)
@d
class K:
    @property
    def p(self):
        return 1
