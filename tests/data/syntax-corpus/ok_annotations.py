x: int = 1
y: 'List[int]'
def f(a: int = 1, *args: str, **kw: int) -> None:
    pass
